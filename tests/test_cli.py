import json

import pytest

from physis.cli import main


def test_embodiments_lists_builtins(capsys):
    main(["embodiments"])
    out = capsys.readouterr().out
    for name in ("metaworld_sawyer", "fetch", "shadow_hand", "pointmaze", "pusht", "aloha"):
        assert name in out


def test_bench_data_writes_results_and_dataset_command_reads_it(tmp_path, capsys):
    out = tmp_path / "bench"
    main(["bench", "data", "--out", str(out), "--episodes", "2", "--episode-length", "20", "--batches", "2",
          "--batch-size", "8", "--workers", "0", "--seek-batches", "1"])
    result = json.loads((out / "results.json").read_text())
    assert result["dataset"]["frames"] == 40
    assert result["dataset"]["window_shapes"]["observation.images.corner"] == [2, 3, 96, 96]
    assert result["dataset"]["window_shapes"]["action"] == [16, 4]
    for mode in ("cached", "cached_uint8", "seek"):
        assert result[mode]["windows"] > 0 and result[mode]["windows_per_s"] > 0
    capsys.readouterr()
    main(["dataset", str(out / "dataset")])
    text = capsys.readouterr().out
    assert "v3.0: 2 episodes, 40 frames at 80 fps" in text


def test_unknown_embodiment_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["embodiments", "robbie"])
    assert e.value.code == 2
    assert "unknown embodiment 'robbie'" in capsys.readouterr().out


def test_suites_lists_and_unknown_suite_lists_the_valid_ones(capsys, tmp_path):
    main(["suites"])
    out = capsys.readouterr().out
    for name in ("metaworld/mt10", "metaworld/mt50", "fetch/pick_and_place", "hand/reach", "pointmaze/bimodal"):
        assert name in out
    main(["suites", "metaworld/mt10"])
    assert "drawer-open-v3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["collect", "--suite", "metaworld/mt11", "--out", str(tmp_path / "x")])
    out = capsys.readouterr().out
    assert "unknown suite 'metaworld/mt11'" in out and "metaworld/mt10" in out
    with pytest.raises(SystemExit):
        main(["eval", "--suite", "metaworld/mt10", "--tasks", "reach", "--out", str(tmp_path / "y")])
    assert "Did you mean 'reach-v3'" in capsys.readouterr().out


def test_eval_command_prints_the_table(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "egl")
    main(["eval", "--suite", "metaworld/mt10", "--tasks", "reach-v3", "--episodes", "1", "--policy", "random",
          "--image-size", "16", "--videos", "0", "--workers", "1", "--max-steps", "5", "--out", str(tmp_path),
          "--no-progress"])
    out = capsys.readouterr().out
    assert "reach-v3" in out and "0/1" in out and "mean success 0.0%" in out
    assert json.loads((tmp_path / "results.json").read_text())["policy"] == "random"
