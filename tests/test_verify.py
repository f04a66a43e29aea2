"""``mltk verify``: where its threshold comes from when --calibrate is not given."""

import json
import shutil

from conftest import one_line_error


def test_verify_of_a_checkpoint_reads_its_run_directorys_evaluation(trained_run, tmp_path, mltk_main):
    run, folder = trained_run
    shutil.copytree(run, tmp_path / "run")  # its own copy: the evaluation below goes into it
    run = tmp_path / "run"
    a, b = folder / "class_00" / "0.png", folder / "class_00" / "1.png"
    for given in (run, run / "best.pt"):  # the advice names the file verify reads, and how to write it
        line = one_line_error(mltk_main("verify", a, b, "--run", given), 2)
        assert line == (
            f"error: no calibrated threshold for {str(given)!r}: {str(run / 'eval' / 'thresholds.json')!r} does not exist; give --calibrate "
            f"EVAL_DIR_OR_DATA, or run `mltk evaluate` on the run directory {str(run)!r} first: it writes that file"
        ), line
    shutil.copy(run / "best.pt", tmp_path / "alone.pt")  # no run directory around it: nowhere to look
    line = one_line_error(mltk_main("verify", a, b, "--run", tmp_path / "alone.pt"), 2)
    assert "no calibrated threshold for checkpoint" in line and "give --calibrate EVAL_DIR_OR_DATA" in line, line
    code, _, err = mltk_main("evaluate", run, "--data", folder, "--no-report", "--workers", "0", "--metrics", "tar_at_far,eer")
    assert code == 0 and (run / "eval" / "thresholds.json").is_file(), err  # as advised
    code, out, err = mltk_main("verify", a, b, "--run", run / "best.pt", "--json")
    assert code == 0 and json.loads(out)["operating_point"] == "far=0.001", err
