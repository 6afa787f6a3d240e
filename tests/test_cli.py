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


def test_unknown_embodiment_is_a_clear_error():
    with pytest.raises(Exception, match="unknown embodiment 'robbie'"):
        main(["embodiments", "robbie"])
