"""Every kind of checkpoint corruption found on resume (a flipped byte, a truncated state file, a missing or
garbled manifest, a missing file, a `latest` naming a missing folder, no `latest` and an empty newer
step folder) is reported
in one warning line, the run resumes from the newest intact checkpoint, and the losses equal an
uninterrupted run's."""
import shutil

import pytest




def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


DAMAGE = {  # what is done to checkpoints/, the problem the warning names, the step resumed from
    "flipped_weights": (lambda c: _flip(c / "step-00000004" / "model.safetensors"),
                        "model.safetensors checksum mismatch", 2),
    "truncated_state": (lambda c: _truncate(c / "step-00000004" / "trainer_state.pt"),
                        "trainer_state.pt size mismatch", 2),
    "missing_manifest": (lambda c: (c / "step-00000004" / "manifest.json").unlink(), "missing manifest", 2),
    "garbled_manifest": (lambda c: (c / "step-00000004" / "manifest.json").write_text("{not json"),
                         "unreadable manifest", 2),
    "missing_meta": (lambda c: (c / "step-00000004" / "meta.json").unlink(), "missing file meta.json", 2),
    "latest_names_missing": (lambda c: shutil.rmtree(c / "step-00000004"), "directory missing", 2),
    "no_latest_and_empty_newer_folder": (lambda c: ((c / "latest").unlink(), (c / "step-00000006").mkdir()),
                                         "missing manifest", 4),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_corruption_falls_back_and_resumes_exactly(kind, stopped, tmp_path, run_cli, same_losses):
    recipe, src = stopped
    run = tmp_path / "run"
    shutil.copytree(src, run)
    damage, problem, resumed_from = DAMAGE[kind]
    damage(run / "checkpoints")
    rc, out, err = run_cli("train", recipe, f"output_dir={run}")
    assert rc == 0 and "Traceback" not in err
    warnings = [l for l in (out + err).splitlines() if l.startswith("warning: skipping corrupt checkpoint")]
    assert len(warnings) == 1 and f"({problem}" in warnings[0], warnings
    assert f"resumed {run} from step {resumed_from}" in out
    same_losses(run)
