"""loom.kernels: the sequence-mixing ops (one folder each) and their context-parallel building blocks.

This folder installs as `loom.kernels`. A Python started in the checkout's root (a REPL, a
notebook, `python -c`, `python script.py` there) has the root on sys.path, so a bare
`import kernels` - which transformers >= 5.25 does for Hugging Face's `kernels` package - would
find this folder instead. Imported under that bare name, this file therefore hands the import
over: it loads the installed package of that name from the rest of sys.path and puts it in
sys.modules, which is what the `import` statement then returns. Without one installed, the bare
name is missing, as it would be anywhere else.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _hand_over():
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None or spec.loader is None:
            del sys.modules["kernels"]
            raise ModuleNotFoundError("No module named 'kernels' (the checkout's kernels/ folder is "
                                      "`loom.kernels`)", name="kernels")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("kernels", None)
            raise

    _hand_over()
