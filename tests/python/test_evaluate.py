"""Tests of dde_tools.evaluate and eval_report: sampling, pairing by seed, scores, win rates, outputs, errors."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from dde_tools import annotators as ann
from dde_tools import eval_report, evaluate, fixtures
from dde_tools.common import MARKER

PROMPTS = ["a red cat", "two golden trees on the moon", "a neon city at night, oil painting"]
STEPS = 2


def run(argv: list[str]) -> tuple[int, str, str]:
    """evaluate.main in-process; returns (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = evaluate.main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


@dataclass
class EvalRun:
    out: Path
    pipelines: dict[str, Path]
    records: list[dict]
    summary: dict
    stdout: str


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join([PROMPTS[0], "", *PROMPTS[1:]]) + "\n")  # the blank line is skipped
    return path


@pytest.fixture(scope="session")
def eval_run(fixture_dir, prompt_file, annotator_flags, tmp_path_factory) -> EvalRun:
    """base = the SD1.5 fixture, dde = another random SD1.5, xl = the SDXL fixture; every annotator."""
    other = fixtures.make_sd15_pipeline(tmp_path_factory.mktemp("sd15_other"), seed=1)
    pipelines = {"base": fixture_dir / "sd15", "dde": other, "xl": fixture_dir / "sdxl"}
    out = tmp_path_factory.mktemp("eval")
    flags = [f for name in ("pickscore", "hps", "clip") for f in annotator_flags[name]]
    argv = [a for name, path in pipelines.items() for a in ("--pipeline", f"{name}={path}")]
    argv += ["--prompts", str(prompt_file), "--out", str(out), "--images-per-prompt", "2", "--steps", str(STEPS),
             "--bootstrap", "200", "--grid-size", "32", "--sample-batch-size", "4", "--device", "cpu", *flags]
    code, stdout, stderr = run(argv)
    assert code == 0, stderr
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    return EvalRun(out, pipelines, records, json.loads((out / "summary.json").read_text()), stdout)


def test_every_image_is_drawn_and_scored(eval_run: EvalRun) -> None:
    assert len(eval_run.records) == 3 * 3 * 2
    keys = {(r["model"], r["prompt_index"], r["image_index"]) for r in eval_run.records}
    assert keys == {(m, i, j) for m in ("base", "dde", "xl") for i in range(3) for j in range(2)}
    for r in eval_run.records:
        assert r["seed"] == 1000 * r["prompt_index"] + r["image_index"]
        assert r["prompt"] == PROMPTS[r["prompt_index"]]
        assert Image.open(eval_run.out / r["image"]).size == (64, 64)
        assert all(np.isfinite(r[name]) for name in ("pickscore", "hps", "clip"))
    assert (eval_run.out / "summary.md").read_text() in eval_run.stdout


@pytest.mark.parametrize("model", ["base", "xl"])
def test_images_are_diffusers_ddim_samples_with_the_family_guidance(eval_run: EvalRun, model: str) -> None:
    """Image 1 of prompt 2, redrawn with diffusers directly: same seed, DDIM, CFG 7.5 (SD1.5) or 5.0 (SDXL)."""
    cls, guidance = (StableDiffusionPipeline, 7.5) if model == "base" else (StableDiffusionXLPipeline, 5.0)
    assert eval_run.summary["settings"]["pipelines"][model]["guidance"] == guidance
    pipe = cls.from_pretrained(eval_run.pipelines[model])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPTS[2], num_inference_steps=STEPS, guidance_scale=guidance,
                    generator=torch.Generator("cpu").manual_seed(2001), output_type="np").images[0]
    saved = np.asarray(Image.open(eval_run.out / "images" / model / "00002_01.png"), dtype=np.float64) / 255
    assert np.abs(saved - expected).max() <= 1.5 / 255  # PNG rounding; batch of 4 vs 1


def test_scores_are_the_annotators_scores_of_the_saved_images(eval_run: EvalRun, annotator_flags) -> None:
    for name in ("pickscore", "hps", "clip"):
        parser = evaluate.parser()
        args = parser.parse_args(["--pipeline", "x", "--prompts", "p", "--out", "o", *annotator_flags[name]])
        annotator = ann.load(ann.specs_from_args(args)[0], torch.device("cpu"))
        for r in eval_run.records[::5]:
            expected = annotator.score([Image.open(eval_run.out / r["image"])], [r["prompt"]])[0]
            assert r[name] == pytest.approx(expected, rel=1e-5, abs=1e-6), (name, r)


def test_summary_means_medians_and_win_rates(eval_run: EvalRun) -> None:
    summary = eval_run.summary
    assert (summary["format"], summary["version"], summary["base"]) == ("dde-eval-summary", 1, "base")
    by = {(r["model"], r["prompt_index"], r["image_index"]): r for r in eval_run.records}
    for model in ("base", "dde", "xl"):
        for name in ("pickscore", "hps", "clip"):
            scores = [r[name] for r in eval_run.records if r["model"] == model]
            entry = summary["models"][model][name]
            assert entry["mean"] == pytest.approx(np.mean(scores))
            assert entry["median"] == pytest.approx(np.median(scores))
            if model == "base":
                assert "vs_base" not in entry
                continue
            outcomes = []
            for (m, i, j), r in by.items():
                if m == model:
                    base = by[("base", i, j)][name]
                    outcomes.append(1.0 if r[name] > base else 0.5 if r[name] == base else 0.0)
            wins = entry["vs_base"]
            assert wins["win_rate"] == pytest.approx(np.mean(outcomes)) and wins["pairs"] == 6
            assert wins["wins"] + wins["ties"] + wins["losses"] == 6
            assert wins["ci95"][0] <= wins["win_rate"] <= wins["ci95"][1]
    table = (eval_run.out / "summary.md").read_text()
    dde = summary["models"]["dde"]["pickscore"]
    assert f"| dde | 6 | {dde['mean']:.4f} | {dde['median']:.4f} | {dde['vs_base']['win_rate']:.3f} |" in table


def test_grid_has_a_row_per_prompt_and_a_column_per_model(eval_run: EvalRun) -> None:
    grid = Image.open(eval_run.out / "grid.png")
    assert grid.size == (3 * 32, 16 + 3 * 32)
    cell = np.asarray(grid)[16 + 32 : 16 + 64, 64:96]  # prompt 1, model xl
    expected = np.asarray(Image.open(eval_run.out / "images" / "xl" / "00001_00.png").resize((32, 32)))
    assert np.array_equal(cell, expected)


def test_identical_pipelines_tie_everywhere() -> None:
    scores = np.random.default_rng(0).normal(size=(10, 3))
    result = eval_report.win_rate(scores, scores.copy(), resamples=100, seed=0)
    assert result["win_rate"] == 0.5 and result["ties"] == 30 and result["ci95"] == [0.5, 0.5]


def test_bootstrap_interval_matches_the_normal_approximation() -> None:
    """400 prompts, wins with probability 0.6: the 95 % interval is about p +- 1.96 sqrt(p(1-p)/n)."""
    rng = np.random.default_rng(1)
    model, base = rng.random((400, 1)) < 0.6, np.full((400, 1), 0.5)
    result = eval_report.win_rate(model.astype(float), base, resamples=4000, seed=0)
    p = result["win_rate"]
    half = 1.96 * np.sqrt(p * (1 - p) / 400)
    assert result["ci95"][0] == pytest.approx(p - half, abs=0.01)
    assert result["ci95"][1] == pytest.approx(p + half, abs=0.01)
    assert eval_report.win_rate(model.astype(float), base, 4000, 0) == result  # seeded


def test_bootstrap_resamples_prompts_not_images() -> None:
    """Each prompt's images all win or all lose: the interval is as wide as with one image per prompt."""
    rng = np.random.default_rng(2)
    per_prompt = (rng.random((100, 1)) < 0.5).astype(float)
    one = eval_report.win_rate(per_prompt, np.full((100, 1), 0.5), 2000, 0)
    many = eval_report.win_rate(np.repeat(per_prompt, 8, axis=1), np.full((100, 8), 0.5), 2000, 0)
    assert many["ci95"] == pytest.approx(one["ci95"])


def test_cli_as_a_module(fixture_dir, prompt_file, annotator_flags, tmp_path, run_cli) -> None:
    proc = run_cli("evaluate", "--pipeline", str(fixture_dir / "sd15"), "--prompts", str(prompt_file),
                   "--out", str(tmp_path), "--steps", "1", "--limit", "1", *annotator_flags["clip_bin"])
    assert proc.returncode == 0, proc.stderr
    assert "| sd15 | 1 |" in proc.stdout
    assert len((tmp_path / "scores.jsonl").read_text().splitlines()) == 1


def test_bad_input_is_reported(fixture_dir, prompt_file, annotator_flags, tmp_path) -> None:
    clip = annotator_flags["clip"]
    sd15 = str(fixture_dir / "sd15")
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "unet_only").mkdir()
    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    (unsupported / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    unparsable = tmp_path / "unparsable"
    unparsable.mkdir()
    (unparsable / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",')
    cases = [
        (["--pipeline", str(tmp_path / "nope")], clip, "no such folder"),
        (["--pipeline", str(tmp_path / "unet_only")], clip, "no model_index.json"),
        (["--pipeline", str(unsupported)], clip, "unsupported pipeline class"),
        (["--pipeline", sd15, "--prompts", str(tmp_path / "none.txt")], clip, "prompt file not found"),
        (["--pipeline", sd15, "--prompts", str(tmp_path / "empty.txt")], clip, "no prompts"),
        (["--pipeline", sd15], [], "no annotator given"),
        (["--pipeline", sd15, "--base", "dde"], clip, "--base: not one of the pipelines"),
        (["--pipeline", f"a={sd15}", "--pipeline", f"a={sd15}"], clip, "two pipelines share a name"),
        (["--pipeline", sd15, "--height", "60"], clip, "not a positive multiple of 8"),
        (["--pipeline", sd15, "--images-per-prompt", "0"], clip, "--images-per-prompt: out of range"),
        (["--pipeline", sd15, "--clip-weights", str(tmp_path / "nope")], [], "--clip-weights does not exist"),
        (["--pipeline", str(unparsable)], clip, "model_index.json does not parse"),
        (["--pipeline", sd15, "--height", "8192"], clip, "--height: not a positive multiple of 8"),
        (["--pipeline", sd15], annotator_flags["hps"][:2], "--hps-arch ViT-H-14: the weights are not of this"),
    ]
    for pipeline_args, annotator_args, fragment in cases:
        argv = ["--prompts", str(prompt_file), "--out", str(tmp_path / "out"), *pipeline_args, *annotator_args]
        code, _, stderr = run(argv)
        assert code == 2, (fragment, stderr)
        assert stderr.startswith("evaluate: error: ") and fragment in stderr, (fragment, stderr)
        assert "expected" in stderr and "found" in stderr, stderr
        assert "Traceback" not in stderr and stderr.count("\n") == 1, stderr
        assert not (tmp_path / "out").exists()  # checked before anything is sampled or written
        assert not (tmp_path / "out.dde-partial").exists()


# ---------------------------------------------------------------------------------------------
# Damaged models, annotator probes, progress, resume, output safety

def damaged_pipeline(source: Path, target: Path, component: str, tensor: str, change) -> Path:
    """A copy of `source` with one tensor of one component replaced by change(tensor)."""
    shutil.copytree(source, target)
    weights = next((target / component).glob("*.safetensors"))
    tensors = load_file(str(weights))
    tensors[tensor] = change(tensors[tensor])
    save_file(tensors, str(weights))
    return target


def cli(fixture_dir: Path, prompt_file: Path, out: Path, pipelines: dict[str, Path], *extra: str) -> list[str]:
    argv = [a for name, path in pipelines.items() for a in ("--pipeline", f"{name}={path}")]
    return argv + ["--prompts", str(prompt_file), "--out", str(out), "--steps", "1", "--device", "cpu",
                   "--bootstrap", "50", "--grid-size", "16", *extra]


class CountingPipelines:
    """Wraps evaluate.load_pipeline: counts the images each pipeline is asked for; can stop after N calls."""

    def __init__(self, monkeypatch, stop_after: int | None = None) -> None:
        self.images: dict[str, int] = {}
        self.calls, self.stop_after = 0, stop_after
        original = evaluate.load_pipeline

        def load(pipeline, device, dtype):
            pipe = original(pipeline, device, dtype)

            def call(**kwargs):
                if self.stop_after is not None and self.calls >= self.stop_after:
                    raise KeyboardInterrupt
                self.calls += 1
                self.images[pipeline.name] = self.images.get(pipeline.name, 0) + len(kwargs["prompt"])
                return pipe(**kwargs)

            return call

        monkeypatch.setattr(evaluate, "load_pipeline", load)


def test_nan_unet_weights_are_refused_naming_component_and_tensor(fixture_dir, prompt_file, annotator_flags,
                                                                  tmp_path) -> None:
    broken = damaged_pipeline(fixture_dir / "sd15", tmp_path / "nan", "unet", "conv_in.weight",
                              lambda t: t.index_fill(0, torch.tensor([0]), float("nan")))
    out = tmp_path / "out"
    code, stdout, stderr = run(cli(fixture_dir, prompt_file, out, {"base": fixture_dir / "sd15", "dde": broken},
                                   *annotator_flags["clip"]))
    assert code == 2, stderr
    assert "pipeline dde: non-finite weights" in stderr and "unet: conv_in.weight holds" in stderr, stderr
    assert str(broken / "unet") in stderr and "Traceback" not in stderr
    assert not out.exists() and "win rate" not in stdout  # nothing is reported, let alone a win
    images = tmp_path / "out.dde-partial" / "images"  # kept for a rerun: base's images, none of dde
    assert len(list((images / "base").glob("*.png"))) == 3 and not list((images / "dde").glob("*.png"))


def test_non_finite_images_are_flagged_never_a_win(fixture_dir, prompt_file, annotator_flags, tmp_path) -> None:
    """Finite weights whose decoder overflows: every image is NaN. Not scored, no win rate, exit 3."""
    def overflow(weight):
        big = weight * 1e38
        assert bool(big.isfinite().all())
        return big

    broken = damaged_pipeline(fixture_dir / "sd15", tmp_path / "overflow", "vae", "post_quant_conv.weight", overflow)
    out = tmp_path / "out"
    code, stdout, stderr = run(cli(fixture_dir, prompt_file, out, {"base": fixture_dir / "sd15", "dde": broken},
                                   *annotator_flags["clip"]))
    assert code == 3, stderr
    assert "evaluate: flagged: dde: 3 of 3 images hold NaN or Inf pixels" in stderr
    summary = json.loads((out / "summary.json").read_text())
    dde = summary["models"]["dde"]["clip"]
    assert dde["vs_base"]["win_rate"] is None and dde["vs_base"]["pairs"] == 0
    assert dde["vs_base"]["excluded_pairs"] == 3 and dde["scored"] == 0 and dde["mean"] is None
    assert summary["models"]["base"]["clip"]["scored"] == 3 and summary["flagged"]
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["clip"] for r in records if r["model"] == "dde"] == [None] * 3
    assert all(r["finite"] is False for r in records if r["model"] == "dde")
    assert "**Flagged:** dde: 3 of 3 images hold NaN" in stdout and "| dde | 0 of 3 | n/a | n/a | n/a" in stdout


def test_a_wrong_architecture_flag_stops_before_sampling(fixture_dir, prompt_file, annotator_flags, tmp_path,
                                                         monkeypatch) -> None:
    """The tiny HPS weights with the default --hps-arch (ViT-H-14): named from the tensor shapes, on the
    meta device (no ViT-H-14 is allocated), before any pipeline is loaded."""
    import open_clip

    def forbidden(*args, **kwargs):
        raise AssertionError("nothing may be built or sampled")

    monkeypatch.setattr(evaluate, "load_pipeline", forbidden)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", forbidden)
    hps = annotator_flags["hps"]
    no_arch = [hps[0], hps[1], *hps[4:]]  # --hps-checkpoint F --open-clip-config C, no --hps-arch
    out = tmp_path / "out"
    code, _, stderr = run(cli(fixture_dir, prompt_file, out, {"base": fixture_dir / "sd15"}, *no_arch))
    assert code == 2 and "--hps-arch ViT-H-14: the weights are not of this open_clip architecture" in stderr
    assert "Pass --hps-arch the architecture" in stderr and "Traceback" not in stderr
    assert not out.exists() and not (tmp_path / "out.dde-partial").exists()


def test_every_annotator_is_probed_before_sampling(fixture_dir, prompt_file, annotator_flags, tmp_path,
                                                   monkeypatch) -> None:
    """A failure that only loading shows (a PickScore processor whose image size is not the model's)."""
    processor = tmp_path / "processor"
    shutil.copytree(annotator_flags["pickscore"][3], processor)
    config = json.loads((processor / "preprocessor_config.json").read_text())
    config["crop_size"] = {"height": 48, "width": 48}
    (processor / "preprocessor_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(evaluate, "load_pipeline", lambda *a: pytest.fail("sampled before the annotators loaded"))
    out = tmp_path / "out"
    flags = ["--pickscore-model", annotator_flags["pickscore"][1], "--pickscore-processor", str(processor)]
    code, _, stderr = run(cli(fixture_dir, prompt_file, out, {"base": fixture_dir / "sd15"},
                              *annotator_flags["clip"], *flags))
    assert code == 2 and "image size does not match --pickscore-model" in stderr, stderr
    assert not out.exists() and not (tmp_path / "out.dde-partial").exists()


def test_progress_goes_to_stderr(fixture_dir, prompt_file, annotator_flags, tmp_path) -> None:
    code, stdout, stderr = run(cli(fixture_dir, prompt_file, tmp_path / "out", {"base": fixture_dir / "sd15"},
                                   "--images-per-prompt", "2", "--sample-only"))
    assert code == 0, stderr
    assert "evaluate: base" in stderr and "6/6" in stderr and "6/6" not in stdout


def test_progress_without_tqdm(monkeypatch, capsys) -> None:
    import builtins

    from dde_tools.common import Progress

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "tqdm" else real_import(name, *a, **k))
    progress = Progress(5, "evaluate: x", initial=1, every=1e9)
    for _ in range(4):
        progress.update()
    progress.close()
    assert capsys.readouterr().err == "evaluate: x: 1/5\nevaluate: x: 5/5\n"


def test_an_interrupted_run_resumes_and_sample_only_then_scores(fixture_dir, prompt_file, annotator_flags,
                                                                 tmp_path, monkeypatch) -> None:
    pipelines = {"base": fixture_dir / "sd15", "dde": fixture_dir / "sd15"}
    out = tmp_path / "out"
    argv = cli(fixture_dir, prompt_file, out, pipelines, "--images-per-prompt", "2", "--sample-batch-size", "2")
    with monkeypatch.context() as patch:
        counting = CountingPipelines(patch, stop_after=4)  # base: 3 batches; dde: 1 of 3
        code, _, stderr = run([*argv, "--sample-only"])
    assert code == 130 and counting.images == {"base": 6, "dde": 2}
    partial = tmp_path / "out.dde-partial"
    assert not out.exists() and len(list((partial / "images" / "dde").glob("*.png"))) == 2
    first = {p.name: p.read_bytes() for p in (partial / "images" / "base").glob("*.png")}

    with monkeypatch.context() as patch:
        counting = CountingPipelines(patch)
        code, stdout, stderr = run([*argv, "--sample-only"])
    assert code == 0, stderr
    assert counting.images == {"dde": 4}  # only what was missing
    assert "dde: 4 images drawn, 2 already there" in stdout
    assert not partial.exists() and not (out / "summary.json").exists() and (out / "grid.png").is_file()
    assert {p.name: p.read_bytes() for p in (out / "images" / "base").glob("*.png")} == first
    assert json.loads((out / MARKER).read_text())["tool"] == "evaluate"

    # A damaged image of the earlier output is drawn again, not decoded (a decompression bomb's header).
    Image.new("1", (9000, 9000)).save(out / "images" / "dde" / "00001_01.png")
    with monkeypatch.context() as patch:
        counting = CountingPipelines(patch)
        code, stdout, stderr = run([*argv, *annotator_flags["clip"]])
    assert code == 0, stderr
    assert counting.images == {"dde": 1}
    assert "base: 0 images drawn, 6 already there" in stdout
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(records) == 12 and all(r["clip"] is not None for r in records)
    assert Image.open(out / "images" / "dde" / "00001_01.png").size == (64, 64)
    # The same images, twice: every pair ties.
    # Base and dde are the same pipeline: five pairs are images drawn in the same batches, so they
    # tie exactly; the redrawn image was drawn alone (batch 1 instead of 2), and a convolution may
    # sum in another order at another batch size on some CPUs, so it ties or nearly ties.
    assert json.loads((out / "summary.json").read_text())["models"]["dde"]["clip"]["vs_base"]["ties"] in (5, 6)


def test_settings_changed_draws_again(fixture_dir, prompt_file, tmp_path, monkeypatch) -> None:
    argv = cli(fixture_dir, prompt_file, tmp_path / "out", {"base": fixture_dir / "sd15"}, "--sample-only")
    assert run(argv)[0] == 0
    with monkeypatch.context() as patch:
        counting = CountingPipelines(patch)
        assert run([*argv, "--guidance", "3.0"])[0] == 0
    assert counting.images == {"base": 3}


def test_out_that_is_not_an_evaluation_is_refused(fixture_dir, prompt_file, tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("{}\n")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / MARKER).write_text(json.dumps({"format": "dde-tool-output", "tool": "export_pickapic"}))
    cases = [(run_dir, "--out holds a dde run (metrics.jsonl)"), (fixture_dir / "sdxl", "--out holds a diffusers "
             "pipeline"), (notes, "--out is not an output of evaluate"), (shards, "is the output of export_pickapic"),
             (fixture_dir, "--out holds an input"), (fixture_dir / "sd15" / "eval", "--out lies inside an input")]
    for out, fragment in cases:
        code, _, stderr = run(cli(fixture_dir, prompt_file, out, {"base": fixture_dir / "sd15"}, "--sample-only"))
        assert code == 2 and fragment in stderr, (out, stderr)
    assert (notes / "todo.txt").read_text() == "keep me" and sorted(p.name for p in notes.iterdir()) == ["todo.txt"]
    assert not (fixture_dir / "sd15" / "eval").exists()
