"""`python -m loom.trainer ...`: the `loom` command."""
import sys

from loom.trainer import drop_checkout_from_path

drop_checkout_from_path()

from loom.trainer.cli import main  # noqa: E402

sys.exit(main())
