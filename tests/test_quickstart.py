"""`physis quickstart` end to end at tiny scale: stages, report numbers, Ctrl-C and re-runs."""

import json
import re
import shlex
from dataclasses import replace

import pytest
import tyro

from physis.cli import main
from physis.eval.heads import HeadsConfig
from physis.eval.runner import EvalConfig
from physis.quickstart import QuickstartConfig, make_plan, run
from physis.sim.collect import CollectConfig
from physis.train.loop import Trainer
from physis.train.run import TrainCommand

TINY = dict(preset="tiny", tasks=("drawer-close-v3",), episodes=1, eval_episodes=1, heldout_episodes=1,
            image_size=32, horizon=8, steps=4, minutes=0.0, batch_size=4, max_steps=12, heads_samples=8,
            workers=1, train_workers=0, save_every=2, progress=False)


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory):
    """A run stopped by Ctrl-C right after the step-2 checkpoint, then the same command again."""
    cfg = QuickstartConfig(out=tmp_path_factory.mktemp("quickstart") / "qs", **TINY)
    original = Trainer.save

    def save_then_interrupt(self):
        path = original(self)
        if self.step >= 2:
            raise KeyboardInterrupt
        return path

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "save", save_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            run(cfg)
    stages = json.loads((cfg.out / "stages.json").read_text())
    assert stages["train"]["done"] is False and stages["collect"]["done"] is True
    assert (cfg.out / "run" / "checkpoints" / "latest").read_text().strip() == "step_000002"
    collected_at = (cfg.out / "demos" / "meta" / "collection.json").stat().st_mtime_ns
    results = run(cfg)
    return cfg, results, collected_at


def test_every_stage_writes_its_outputs(interrupted_then_resumed):
    cfg, results, _ = interrupted_then_resumed
    out = cfg.out
    for path in ("demos/meta/collection.json", "heldout/meta/collection.json", "run/summary.json",
                 "run/metrics.jsonl", "eval/results.json", "eval/success.png", "heads/heads.json",
                 "heads/world_model.png", "trace/trace.json", "training_curves.png", "results.json", "report.html"):
        assert (out / path).is_file(), path
    videos = [v for t in results["tasks"].values() for v in t["videos"]]
    assert videos == ["eval/videos/drawer-close-v3_seed1000000.mp4"]
    assert (out / results["tasks"]["drawer-close-v3"]["videos"][0]).is_file()
    # results.json keeps the evaluation's schema at the top level and adds the other stages.
    evaluation = json.loads((out / "eval" / "results.json").read_text())
    for key in ("suite", "checkpoint", "episodes_per_task", "seed", "mean_success"):
        assert results[key] == evaluation[key]
    assert results["tasks"]["drawer-close-v3"]["successes"] == evaluation["tasks"]["drawer-close-v3"]["successes"]
    assert results["training"]["steps"] == 4 and results["data"]["episodes"] == 1
    trace = results["subtask_trace"]
    assert trace["steps"] == len(trace["expert"]) == len(trace["model"]) > 0
    assert trace["agreeing_steps"] == sum(a == b for a, b in zip(trace["expert"], trace["model"], strict=True))
    # The held-out demonstrations come from a disjoint part of the training-seed range.
    heldout = json.loads((out / "heldout" / "meta" / "collection.json").read_text())
    demos = json.loads((out / "demos" / "meta" / "collection.json").read_text())
    assert not {e["seed"] for e in heldout["episodes"]} & {e["seed"] for e in demos["episodes"]}


def test_report_is_self_contained_and_its_numbers_are_those_of_results_json(interrupted_then_resumed):
    cfg, results, _ = interrupted_then_resumed
    page = (cfg.out / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the report must not load anything"
    assert "data:video/mp4;base64," in page and "data:image/png;base64," in page
    shown = [(m["key"], m["value"], m["text"]) for m in re.finditer(
        r'data-key="(?P<key>[^"]+)"(?: data-value="(?P<value>[^"]*)")?>(?P<text>[^<]*)<', page)]
    task = "tasks.drawer-close-v3"
    for key in (f"{task}.successes", f"{task}.episodes", f"{task}.success_rate", f"{task}.ci95", "mean_success",
                "mean_success_ci95", "heads.subtask_accuracy", "heads.progress_pearson", "heads.action_mse",
                "heads.world_model_latent_mse", "heads.copy_baseline_latent_mse", "subtask_trace.agreement",
                "training.steps"):
        assert key in {k for k, _, _ in shown}, key
    for key, value, text in shown:
        truth = results
        for part in key.split("."):
            truth = truth[part]
        if key.endswith("ci95"):
            assert text == f"{100 * truth[0]:.0f}%–{100 * truth[1]:.0f}%", key
            continue
        assert float(value) == truth, key
        if key.endswith(("success_rate", "agreement")):
            assert text == f"{100 * truth:.0f}%", key
        elif key in ("mean_success", "heads.subtask_accuracy"):
            assert text == f"{100 * truth:.1f}%", key
        elif key.startswith("heads."):
            assert text == f"{truth:.3f}", key
        elif key.startswith("training.final_losses."):
            assert text == f"{truth:.4f}", key
        elif isinstance(truth, int):
            assert text.replace(",", "") == str(truth), key
    successes = results["tasks"]["drawer-close-v3"]["successes"]
    assert f"{successes}/1" in page


def test_a_rerun_resumes_training_from_its_checkpoint_and_reuses_the_collection(interrupted_then_resumed):
    cfg, results, collected_at = interrupted_then_resumed
    stages = results["quickstart"]["stages"]
    assert stages["collect"]["status"] == "reused" and stages["collect_heldout"]["status"] == "reused"
    assert stages["train"]["status"] == "resumed" and stages["train"]["start_step"] == 2
    assert json.loads((cfg.out / "run" / "summary.json").read_text())["start_step"] == 2
    assert (cfg.out / "demos" / "meta" / "collection.json").stat().st_mtime_ns == collected_at
    steps = [json.loads(line)["step"] for line in (cfg.out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the first session logged steps 1-2, the resumed one 3-4, none twice


def test_a_finished_run_is_reused_and_an_interrupted_stage_is_redone(interrupted_then_resumed, capsys):
    cfg, _, _ = interrupted_then_resumed
    checkpoint = (cfg.out / "run" / "checkpoints" / "latest").read_text()
    # As if Ctrl-C had hit the evaluation of a second run: the stage is not marked done and left a stray file.
    stages = json.loads((cfg.out / "stages.json").read_text())
    stages["eval"]["done"] = False
    (cfg.out / "stages.json").write_text(json.dumps(stages))
    (cfg.out / "eval" / "partial.tmp").write_text("left by an interrupted evaluation")
    main(["quickstart", "--out", str(cfg.out), *_flags(TINY)])
    printed = capsys.readouterr().out
    assert "drawer-close-v3" in printed and "report.html" in printed
    again = json.loads((cfg.out / "results.json").read_text())["quickstart"]["stages"]
    assert {k: v["status"] for k, v in again.items()} == {
        "collect": "reused", "collect_heldout": "reused", "train": "reused", "eval": "ran", "heads": "reused",
        "trace": "reused"}
    assert not (cfg.out / "eval" / "partial.tmp").exists()
    assert (cfg.out / "run" / "checkpoints" / "latest").read_text() == checkpoint


def test_the_reported_commands_reproduce_each_stage(tmp_path):
    cfg = QuickstartConfig(out=tmp_path / "qs", **{**TINY, "tasks": ("drawer-close-v3", "door-open-v3")})
    plan = make_plan(cfg)
    quiet = {"progress": False}
    for key, cls, expected, skip in (
            ("collect", CollectConfig, plan.demos, {"workers": 1}),
            ("collect_heldout", CollectConfig, plan.heldout, {"workers": 1}),
            ("train", TrainCommand, plan.train, {"workers": 0}),
            ("eval", EvalConfig, plan.eval, {"workers": 1}),
            ("eval_heads", HeadsConfig, plan.heads, {})):
        args = shlex.split(plan.commands[key])[2:]
        parsed = tyro.cli(cls, args=args, config=(tyro.conf.OmitArgPrefixes,))
        assert replace(parsed, **quiet, **skip) == expected, key
    parsed = tyro.cli(QuickstartConfig, args=shlex.split(plan.commands["quickstart"])[2:],
                      config=(tyro.conf.OmitArgPrefixes,))
    assert replace(parsed, **quiet) == cfg


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="--trace-task 'reach-v3' is not one of --tasks"):
        make_plan(QuickstartConfig(out=tmp_path, **{**TINY, "trace_task": "reach-v3"}))
    with pytest.raises(ValueError, match="give a training budget"):
        make_plan(QuickstartConfig(out=tmp_path, **{**TINY, "steps": 0, "minutes": 0.0}))
    with pytest.raises(ValueError, match="--eval-episodes must be >= 1"):
        make_plan(QuickstartConfig(out=tmp_path, **{**TINY, "eval_episodes": 0}))
    with pytest.raises(ValueError, match="--image-size 64 is not a multiple of the patch size 12 \\(preset small\\)"):
        make_plan(QuickstartConfig(out=tmp_path, **{**TINY, "preset": "small", "image_size": 64}))


def _flags(settings: dict) -> list[str]:
    args = []
    for key, value in settings.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", *map(str, value if isinstance(value, tuple) else [value])]
    return args
