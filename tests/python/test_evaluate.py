"""Tests of dde_tools.evaluate and eval_report: sampling, pairing by seed, scores, win rates, outputs, errors."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from dde_tools import annotators as ann
from dde_tools import eval_report, evaluate, fixtures

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
    ]
    for pipeline_args, annotator_args, fragment in cases:
        argv = ["--prompts", str(prompt_file), "--out", str(tmp_path / "out"), *pipeline_args, *annotator_args]
        code, _, stderr = run(argv)
        assert code == 2, (fragment, stderr)
        assert stderr.startswith("evaluate: error: ") and fragment in stderr, (fragment, stderr)
        assert "expected" in stderr and "found" in stderr, stderr
        assert not (tmp_path / "out").exists()  # checked before anything is sampled or written
