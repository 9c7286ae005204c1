"""Story coherence II: CLIP-I / CLIP-T / copy-paste metrics, choosing the 8 panels together
(sampler.best_of.select=story), the candidates grid, and reproducing either selection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_story.bench.select import random_candidates
from kolors_story.config import ScorerSettings
from kolors_story.evaluate.objective import (
    EXHAUSTIVE_LIMIT,
    Candidates,
    Objective,
    choose_story,
    coordinate_ascent,
    exhaustive,
    story_terms,
)
from kolors_story.evaluate.summary import story_scores
from kolors_story.generate.best_of import StoryPicker
from tests.test_generate import pixels, run_generate, shared_hires_best

# ---------------------------------------------------------------------------- fixtures


def flat_image(value: int, pattern: int = 0) -> Image.Image:
    """A 64x64 picture: grey ``value`` with a bright square at a place picked by ``pattern``."""
    px = np.full((64, 64, 3), value, np.uint8)
    y, x = divmod(pattern % 16, 4)
    px[y * 16 : y * 16 + 16, x * 16 : x * 16 + 16] = 250
    return Image.fromarray(px)


class HandSetScorer:
    """Scores and CLIP image embeddings set by hand per image (looked up by identity)."""

    def __init__(self, table: dict[int, tuple[float, np.ndarray]]):
        self.table = table

    def score_and_embed(self, images, progress=False):
        rows = [self.table[id(im)] for im in images]
        return [r[0] for r in rows], torch.tensor(np.stack([r[1] for r in rows]), dtype=torch.float32)

    def score(self, images, progress=False):
        return self.score_and_embed(images)[0]


def coherent_embeddings(count: int, seed: int = 0, spread: float = 0.5) -> np.ndarray:
    """Unit vectors sharing one direction (a style) with their own variation: cosines 0.75-0.95."""
    rng = np.random.default_rng(seed)
    style = np.ones(16) / 4.0
    e = style + spread * rng.normal(size=(count, 16)) / 4.0
    return e / np.linalg.norm(e, axis=1, keepdims=True)


# ---------------------------------------------------------------------------- the search


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_coordinate_ascent_finds_the_brute_force_story(n, seed):
    cands = random_candidates(seed, n=n)
    for objective in (Objective(), Objective(min_floor=5.6), Objective(coherence_weight=6.0, copy_paste_weight=20.0)):
        best = exhaustive(cands, objective)
        heuristic = coordinate_ascent(cands, objective, restarts=8)
        assert heuristic == best, (seed, objective)
        # and the brute force really is the best: no single-scene change improves it
        key = story_terms(cands, best, objective)
        for s in range(8):
            for k in range(n):
                other = story_terms(cands, best[:s] + [k] + best[s + 1:], objective)
                assert (other["gate"], other["objective"]) <= (key["gate"], key["objective"])


def test_story_choice_is_at_least_the_per_scene_choice_beyond_brute_force():
    objective = Objective()
    for seed in range(4):
        cands = random_candidates(seed, n=5)  # 5^8 = 390625 stories: coordinate ascent
        assert 5 ** 8 > EXHAUSTIVE_LIMIT
        chosen, method = choose_story(cands, objective)
        assert method.startswith("coordinate ascent")
        per_scene = [int(np.argmax(row)) for row in cands.aesthetic]
        won, base = story_terms(cands, chosen, objective), story_terms(cands, per_scene, objective)
        assert (won["gate"], won["objective"]) >= (base["gate"], base["objective"])


def test_the_gate_decides_before_the_objective():
    # scene 1: candidate 0 is pretty and fits the set; candidate 1 is plainer. Without a floor the
    # best story takes candidate 0; a floor above candidate 0's score of scene 2 forces the other.
    a = np.array([[6.5, 6.2], [5.5, 6.3]])
    cos = np.ones((2, 2, 2, 2)) * 0.5
    cands = Candidates(aesthetic=a, clip_t=np.zeros_like(a), cos=cos, copy=np.zeros_like(cos, dtype=bool))
    assert exhaustive(cands, Objective(threshold=6.0)) == [0, 1]
    cos[0, 0, 1, 0] = cos[1, 0, 0, 0] = 1.0  # 0/0 belong together: mean 6.0 passes, objective higher
    assert exhaustive(cands, Objective(threshold=6.0)) == [0, 0]
    assert exhaustive(cands, Objective(threshold=6.0, min_floor=6.0)) == [0, 1]  # 5.5 is under the floor
    assert exhaustive(cands, Objective(threshold=6.1)) == [0, 1]  # [0, 0] misses the gate (mean 6.0)


# ---------------------------------------------------------------------------- copy-paste


def test_eight_copies_are_flagged_and_lose_to_a_varied_coherent_story():
    copies = [flat_image(120, 3)] * 8
    varied = [flat_image(60 + 20 * i, i * 5) for i in range(8)]
    same = np.tile(coherent_embeddings(1), (8, 1))
    coherent = coherent_embeddings(8)
    scores = [6.4] * 8
    copy_story = story_scores(scores, torch.tensor(same), images=copies).to_json()
    varied_story = story_scores(scores, torch.tensor(coherent), images=varied).to_json()
    assert copy_story["coherence"] == pytest.approx(1.0) and copy_story["coherence"] > varied_story["coherence"] > 0.7
    assert len(copy_story["duplicate_pairs"]) == 28 and copy_story["copy_paste"] == 1.0
    assert set(copy_story["duplicate_pairs"][0]["why"]) == {"pixels", "embedding"}
    assert varied_story["duplicate_pairs"] == [] and varied_story["copy_paste"] == 0.0
    assert copy_story["story_objective"] < varied_story["story_objective"]
    # a re-encoded copy (other pixels, same embedding) and a pixel copy (other embedding) are both caught
    emb = coherent.copy()
    emb[5] = emb[2]
    mixed = story_scores(scores, torch.tensor(emb), images=varied[:7] + [varied[0]]).to_json()
    assert [(p["panels"], p["why"]) for p in mixed["duplicate_pairs"]] == [([1, 8], ["pixels"]), ([3, 6], ["embedding"])]
    assert mixed["copy_paste"] == pytest.approx(2 / 28)


def test_story_selection_does_not_take_the_copies_per_scene_selection_would():
    """Candidate 0 of every scene is the same picture, scored a little higher; candidate 1 is a
    varied, coherent panel. Per scene, the copies win; chosen as a story, they lose."""
    copy_image, copy_embedding = flat_image(120, 3), coherent_embeddings(1, seed=9)[0]
    grid, table = [], {}
    varied = coherent_embeddings(8)
    for s in range(8):
        twin = copy_image.copy()  # its own object, same pixels
        panel = flat_image(60 + 20 * s, s * 5)
        table[id(twin)] = (6.5, copy_embedding)
        table[id(panel)] = (6.3, varied[s])
        grid.append([twin, panel])
    picker = StoryPicker(HandSetScorer(table), None, [""] * 8, ScorerSettings())
    picked = picker(grid, [[s, s + 1000] for s in range(8)])
    record = picked.record
    assert record["per_scene_best"] == [0] * 8 and record["per_scene_best_story"]["copy_paste"] == 1.0
    assert picked.chosen.count(0) <= 1  # at most one copy survives: a copy needs a twin to be one
    assert record["chosen_story"]["copy_paste"] == 0.0 and record["chosen_story"]["gate"]
    assert record["chosen_story"]["objective"] > record["per_scene_best_story"]["objective"]
    assert "each scene's best aesthetic candidate would give" in record["why"]
    assert [c["score"] for c in picked.candidates[0]] == [6.5, 6.3]


# ---------------------------------------------------------------------------- prompt alignment


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def coloured_square(rgb, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    px = np.full((96, 96, 3), 245, np.uint8) + rng.integers(-8, 8, (96, 96, 3)).astype(np.uint8)
    y, x = rng.integers(8, 40, 2)
    px[y : y + 48, x : x + 48] = rgb
    return Image.fromarray(px)


@pytest.fixture(scope="module")
def trained_tiny_clip(tmp_path_factory):
    """The tiny CLIP (both towers) trained for a few steps, contrastively, on coloured squares."""
    from transformers import CLIPModel, CLIPProcessor

    from kolors_story.tiny.scorer import ensure_tiny_clip

    folder = ensure_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder, use_fast=False)
    untrained = CLIPModel.from_pretrained(folder).eval()
    torch.manual_seed(0)
    optim = torch.optim.AdamW(model.parameters(), lr=2e-3)
    names = list(COLOURS)
    model.train()
    for step in range(80):
        images = [coloured_square(COLOURS[c], seed=step * 10 + i) for i, c in enumerate(names)]
        batch = processor(text=[f"a {c} square" for c in names], images=images, return_tensors="pt", padding=True)
        loss = model(**batch, return_loss=True).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    return model.eval(), processor, untrained


def test_prompt_alignment_ranks_the_matching_prompt_first(trained_tiny_clip):
    from kolors_story.evaluate.alignment import PromptAligner

    model, processor, untrained = trained_tiny_clip
    names = list(COLOURS)
    images = [coloured_square(COLOURS[c], seed=1000 + i) for i, c in enumerate(names)]  # unseen squares

    def matrix(clip):
        aligner = PromptAligner(clip, processor, batch_size=3)  # batches that split the story
        return np.array([aligner.alignment(images, [f"a {c} square" for _ in images]) for c in names]).T

    sims = matrix(model)  # [image, prompt]
    for i, colour in enumerate(names):
        assert sims[i].argmax() == i, (colour, sims[i])
    own = PromptAligner(model, processor).alignment(images, [f"a {c} square" for c in names])
    assert own == pytest.approx(list(np.diag(sims)), abs=1e-5)
    # an image with no English prompt gets no score rather than a made-up one
    assert PromptAligner(model, processor).alignment(images[:2], ["a red square", ""])[1] is None
    # the random tiny CLIP does not know colours: the ranking comes from the training
    assert sum(matrix(untrained)[i].argmax() == i for i in range(4)) < 4


def test_missing_clip_folder_names_the_download_command(tmp_path):
    from kolors_story.evaluate.alignment import AlignmentError, PromptAligner

    with pytest.raises(AlignmentError, match=r"python -m kolors_story.download clip.*scorer.alignment=false"):
        PromptAligner.from_settings(ScorerSettings(clip_path=str(tmp_path / "nope"), device="cpu"))


def test_generate_refuses_before_loading_when_clip_is_missing(tmp_path):
    from kolors_story.evaluate.alignment import AlignmentError
    from kolors_story.generate.checks import check_generate
    from tests.helpers import settings

    job = settings("generate", ["model=tiny", "score=true", "scorer.tiny=null",
                                f"scorer.path={tmp_path}", f"scorer.clip_path={tmp_path / 'clip'}"])
    from kolors_story.tiny.scorer import ensure_tiny_scorer

    ensure_tiny_scorer(tmp_path, seed=0)
    with pytest.raises(AlignmentError, match=str(tmp_path / "clip")):
        check_generate(job, tmp_path / "out")
    job.scorer.alignment = False
    check_generate(job, tmp_path / "out")  # no CLIP needed without CLIP-T


# ---------------------------------------------------------------------------- end to end (tiny Kolors)


@pytest.fixture(scope="module")
def story_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("story_select")
    result, cfg = run_generate(tmp, "sampler.best_of.n=4", "sampler.best_of.select=story", "score=true", name="out")
    return Path(result["out_dir"]), cfg


def test_story_selection_is_recorded_with_every_candidate(story_run):
    out, _ = story_run
    manifest = json.loads((out / "manifest.json").read_text())
    sel = manifest["selection"]
    assert sel["select"] == "story" and sel["method"] == "exhaustive (4^8 stories)"
    assert sel["objective"]["coherence_weight"] == 2.0 and "formula" in sel["objective"]
    assert [len(c) for c in sel["candidates"]] == [4] * 8
    assert all(isinstance(c["score"], float) and isinstance(c["clip_t"], float) for row in sel["candidates"] for c in row)
    assert sel["chosen"] == manifest["best_of"]["chosen"] == [s["chosen_candidate"] for s in manifest["scenes"]]
    assert manifest["best_of"]["selected_by"] == "story objective"
    won, base = sel["chosen_story"], sel["per_scene_best_story"]
    assert (won["gate"], won["objective"]) >= (base["gate"], base["objective"])  # never worse than per scene
    assert sel["per_scene_best"] == [max(range(4), key=lambda k, r=row: (r[k]["score"], -k)) for row in sel["candidates"]]
    # the published story's own scores are the chosen story's numbers
    scores = json.loads((out / "scores.json").read_text())
    assert scores["story_objective"] == pytest.approx(won["objective"], abs=1e-4)
    assert scores["mean"] == pytest.approx(won["mean"], abs=1e-5) and scores["coherence"] == pytest.approx(won["coherence"], abs=1e-5)
    assert scores["clip_t"] == pytest.approx(won["clip_t"], abs=1e-4)
    assert len(scores["alignment"]) == 8 and scores["copy_paste"] == pytest.approx(won["copy_paste"])
    for n, scene in enumerate(manifest["scenes"]):
        assert scene["score"] == pytest.approx(sel["candidates"][n][sel["chosen"][n]]["score"], abs=1e-5)


def test_candidates_grid_shows_every_candidate_with_the_chosen_framed(story_run):
    out, _ = story_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["candidates_panel"] == "candidates.png"
    grid = np.asarray(Image.open(out / "candidates.png").convert("RGB")).astype(int)
    tile = 192
    cap = max(16, tile // 10)
    assert grid.shape[:2] == (4 * (tile + cap), 8 * tile)  # 4 rows (candidates) x 8 columns (scenes)
    red = (grid[..., 0] > 200) & (grid[..., 1] < 60) & (grid[..., 2] < 60)
    for s, k in enumerate(manifest["selection"]["chosen"]):
        for row in range(4):
            corner = red[row * (tile + cap), s * tile]
            assert bool(corner) == (row == k), (s, row)
    # the kept candidate's tile is the published image
    s, k = 0, manifest["selection"]["chosen"][0]
    tile_px = grid[k * (tile + cap) + 10 : k * (tile + cap) + tile - 10, 10 : tile - 10]
    kept = np.asarray(Image.open(out / "1.png").convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(tile_px - kept[10:-10, 10:-10]).mean() < 1.0


def test_story_selection_reproduces_bit_identically(story_run, tmp_path):
    from kolors_story.generate.reproduce import reproduce

    out, _ = story_run
    report = reproduce(out, tmp_path / "again", progress=False)
    assert report["all_identical"], report["images"]
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert again["best_of"]["chosen"] == json.loads((out / "manifest.json").read_text())["selection"]["chosen"]
    assert not (tmp_path / "again" / "candidates.png").exists()  # only the kept candidates were rendered


def test_evaluate_scores_clip_t_against_the_prompts_recorded_beside_the_story(story_run, tmp_path, capsys):
    from kolors_story.cli import evaluate_from_config
    from tests.helpers import compose

    out, _ = story_run
    result = evaluate_from_config(compose("evaluate", ["model=tiny", f"images={out}", f"output_dir={tmp_path}"]))
    generated = json.loads((out / "scores.json").read_text())
    assert result["ignored"] == ["candidates.png", "panel.png"]
    assert result["alignment"] == pytest.approx(generated["alignment"], abs=1e-4)
    assert result["story_objective"] == pytest.approx(generated["story_objective"], abs=1e-4)
    assert [row["clip_t"] for row in result["per_image"]] == pytest.approx(generated["alignment"], abs=1e-4)
    assert "alignment_note" not in json.loads((tmp_path / "scores.json").read_text())
    printed = capsys.readouterr().out
    assert "CLIP-T" in printed and "story objective" in printed
    # without recorded prompts there is no CLIP-T, and the report says why
    bare = tmp_path / "bare"
    bare.mkdir()
    for n in range(1, 9):
        (bare / f"{n}.png").write_bytes((out / f"{n}.png").read_bytes())
    result = evaluate_from_config(compose("evaluate", ["model=tiny", f"images={bare}"]))
    assert result["clip_t"] is None and "no English prompts" in result["alignment_note"]


def test_scene_selection_keeps_each_scenes_highest_scored_candidate(tmp_path_factory, tmp_path):
    """select=scene (the default) is the behaviour before story selection: render every candidate
    set on its own, score it, keep each scene's highest (ties: the lower candidate); the images
    are those, pixel for pixel."""
    from kolors_story.config.compose import explicit_keys, to_settings
    from kolors_story.evaluate.scorer import AestheticScorer
    from kolors_story.generate.job import generate
    from kolors_story.plan.auto import cpu_generation_defaults

    made = shared_hires_best(tmp_path_factory)  # best_of.n=2, select left at its default
    # the settings generate.py ran with: on a CPU it picks the scene batch the command line left open
    job = cpu_generation_defaults(to_settings(made["cfg"], "generate"), explicit_keys(made["cfg"]))
    assert job.sampler.best_of.select == "scene"
    scorer = AestheticScorer.from_settings(job.scorer)
    sets = []
    for k in range(2):  # candidate k of every scene, rendered in the same batch as in the best-of run
        generate(job, out_dir=tmp_path / f"k{k}", choices=[k] * 8, progress=False)
        sets.append(pixels(tmp_path / f"k{k}"))
    scores = [scorer.score([Image.fromarray(im.astype(np.uint8)) for im in s]) for s in sets]
    expected = [max(range(2), key=lambda k, n=n: (scores[k][n], -k)) for n in range(8)]
    manifest = json.loads((made["out"] / "manifest.json").read_text())
    assert manifest["selection"]["select"] == "scene" and manifest["selection"]["chosen"] == expected
    kept = pixels(made["out"])
    for n, k in enumerate(expected):
        assert (kept[n] == sets[k][n]).all(), n
    assert (made["out"] / "candidates.png").exists()


def test_bad_select_value_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="sampler.best_of.select='panel'.*scene, story"):
        run_generate(tmp_path, "sampler.best_of.n=2", "sampler.best_of.select=panel")
