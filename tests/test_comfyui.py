"""The story as a ComfyUI workflow (comfyui=true, and always in a submission bundle): valid for the
node signatures of ComfyUI core and ComfyUI-Kolors-MZ (tests/data/comfyui_nodes.json, written from
their source), the same graph in the API file, the UI file and every PNG, the sampler mapping, and
the docs page showing the real graph."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kolors_story.generate.comfyui import COMFYUI_SAMPLERS, comfyui_sampler, story_workflow
from kolors_story.records import Manifest
from tests.helpers import REPO, compose, settings
from tests.test_generate import STEPS, make_lora

SPEC = json.loads((REPO / "tests" / "data" / "comfyui_nodes.json").read_text(encoding="utf-8"))
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "COMBO", "BOOLEAN")
STORIES = ("idol_diary", "ink_dream", "warrior_dragon")
BUNDLE = ("story=ink_dream", "sampler.hires.enabled=true", "sampler.hires.scale=1.5", "sampler.hires.steps=4",
          "sampler.hires.strength=0.5", "sampler.best_of.n=2", "sampler.best_of.select=story", "submit.team=Comfy")


def _render(tmp: Path, name: str, *overrides: str):
    """generate.py's job (render + bundle when submit.team is set) on the tiny model; (result, job)."""
    from kolors_story.cli import generate_from_config
    from kolors_story.config.compose import to_settings

    cfg = compose("generate", ["model=tiny", STEPS, f"output_dir={tmp / name}", *overrides])
    return generate_from_config(cfg), to_settings(cfg, "generate")


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model_dir):
    """The three stories (idol_diary with a LoRA, warrior_dragon without comfyui=true) and a bundle with
    hires, best-of (story selection) and two stacked LoRAs: rendered once for the module."""
    tmp = tmp_path_factory.mktemp("comfyui")
    style = make_lora(tmp / "style" / "checkpoints" / "step-000010", tiny_model_dir, seed=3)
    entity = make_lora(tmp / "entity" / "checkpoints" / "step-000010", tiny_model_dir, seed=4)
    out = {"idol_diary": _render(tmp, "idol_diary", "comfyui=true", f"lora_path={style['diffusers']}"),
           "ink_dream": _render(tmp, "ink_dream", "story=ink_dream", "comfyui=true"),
           "warrior_dragon": _render(tmp, "warrior_dragon", "story=warrior_dragon"),
           "bundle": _render(tmp, "bundle", *BUNDLE, f"lora_path={style['diffusers']}", "lora_scale=0.8",
                             f"loras=[{{path: {entity['diffusers']}, scale: 0.6}}]")}
    return out


def _workflow(made, name: str):
    """(API graph, UI graph, manifest, folder) of one render: the written files, or the bundle's."""
    result, job = made[name]
    folder = result.bundle if name == "bundle" else result.out_dir
    manifest = Manifest.read(folder / "manifest.json")
    if name == "warrior_dragon":  # written without comfyui=true: the graph its manifest gives
        wf = story_workflow(manifest, job.comfyui)
        return wf.api, wf.ui, manifest, folder
    read = [json.loads((folder / f).read_text(encoding="utf-8")) for f in ("workflow_api.json", "workflow.json")]
    return read[0], read[1], manifest, folder


# ------------------------------------------------------------------ the node signatures, from their source


def _value_problem(kind: str, opts: dict, value) -> str | None:
    if kind == "INT":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "FLOAT":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a STRING"
    elif kind == "COMBO":
        if "options" in opts:
            return None if value in opts["options"] else f"{value!r} is not one of {opts['options']}"
        ok = isinstance(value, str) and bool(value) and value.endswith(tuple(opts.get("extensions", [""])))
    else:
        return f"{value!r} is a widget value where a {kind} link is declared"
    if not ok:
        return f"{value!r} is not a valid {kind}"
    if not opts.get("min", value) <= value <= opts.get("max", value):
        return f"{value} is outside [{opts.get('min')}, {opts.get('max')}]"
    return None


def api_problems(api: dict) -> list[str]:
    """Every way ``api`` disagrees with the declared node signatures."""
    problems = []
    for nid, node in api.items():
        decl = SPEC["nodes"].get(node.get("class_type"))
        if decl is None:
            problems.append(f"{nid}: unknown class_type {node.get('class_type')!r}")
            continue
        declared = {**decl["input"]["required"], **decl["input"].get("optional", {})}
        problems += [f"{nid}.{k}: not a declared input" for k in node["inputs"] if k not in declared]
        problems += [f"{nid}.{k}: required input missing" for k in decl["input"]["required"] if k not in node["inputs"]]
        for name, value in node["inputs"].items():
            if name not in declared:
                continue
            kind, opts = declared[name]
            if isinstance(value, list):  # a link [node id, output index]
                source = api.get(value[0])
                outputs = SPEC["nodes"].get(source["class_type"], {}).get("output", []) if source else []
                if not (isinstance(value[0], str) and isinstance(value[1], int) and value[1] < len(outputs)):
                    problems.append(f"{nid}.{name}: link {value} points to no output")
                elif outputs[value[1]] != kind:
                    problems.append(f"{nid}.{name}: link gives {outputs[value[1]]}, the input takes {kind}")
            elif (why := _value_problem(kind, opts, value)) is not None:
                problems.append(f"{nid}.{name}: {why}")
    return problems


def _linked(api: dict, link: list) -> dict:
    return api[link[0]]


def scene_chains(api: dict) -> dict[int, dict]:
    """For each SaveImage (prefix = scene index): the KSamplers behind it, its texts and the LoRA stack."""
    out = {}
    for node in api.values():
        if node["class_type"] != "SaveImage":
            continue
        samplers, latent = [], _linked(api, _linked(api, node["inputs"]["images"])["inputs"]["samples"])
        while latent["class_type"] in ("KSampler", "LatentUpscale"):
            if latent["class_type"] == "KSampler":
                samplers.insert(0, latent)
                latent = _linked(api, latent["inputs"]["latent_image"])
            else:
                latent = _linked(api, latent["inputs"]["samples"])
        first = samplers[0]["inputs"]
        model, loras = _linked(api, first["model"]), []
        while model["class_type"] == "LoraLoaderModelOnly":
            loras.insert(0, (model["inputs"]["lora_name"], model["inputs"]["strength_model"]))
            model = _linked(api, model["inputs"]["model"])
        out[int(node["inputs"]["filename_prefix"])] = {
            "samplers": [s["inputs"] for s in samplers], "empty": latent, "unet": model, "loras": loras,
            "positive": _linked(api, first["positive"])["inputs"]["text"],
            "negative": _linked(api, first["negative"])["inputs"]["text"]}
    return out


@pytest.mark.parametrize("name", [*STORIES, "bundle"])
def test_api_workflow_is_valid_for_comfyui_and_kolors_mz_and_renders_the_manifest(made, name):
    api, _, manifest, _ = _workflow(made, name)
    assert api_problems(api) == []
    chains = scene_chains(api)
    assert sorted(chains) == [s.index for s in manifest.scenes] == list(range(1, 9))
    height, width = manifest.hires.stage1_size if manifest.hires else manifest.sampler.size
    for scene in manifest.scenes:
        chain = chains[scene.index]
        first = chain["samplers"][0]
        assert (chain["positive"], chain["negative"]) == (scene.prompt, scene.negative)
        assert (first["seed"], first["steps"], first["cfg"], first["denoise"]) == (
            scene.seed, manifest.sampler.steps, manifest.sampler.cfg, 1.0)
        assert (first["sampler_name"], first["scheduler"]) == COMFYUI_SAMPLERS[manifest.sampler.scheduler]
        assert (chain["empty"]["inputs"]["width"], chain["empty"]["inputs"]["height"]) == (width, height)
        assert [s for _, s in chain["loras"]] == [lo.scale for lo in manifest.loras]
    # one text-encoder loader and one UNet/LoRA/VAE chain, shared by every scene
    kinds = [n["class_type"] for n in api.values()]
    assert [kinds.count(k) for k in ("MZ_ChatGLM3Loader", "MZ_KolorsUNETLoaderV2", "VAELoader")] == [1, 1, 1]
    assert kinds.count("LoraLoaderModelOnly") == len(manifest.loras)


def test_bundle_maps_hires_best_of_and_stacked_loras(made):
    api, _, manifest, bundle = _workflow(made, "bundle")
    assert len(manifest.loras) == 2 and manifest.hires and manifest.best_of.n == 2
    chains = scene_chains(api)
    for scene in manifest.scenes:
        chain = chains[scene.index]
        # two LoRAs chained in order with their strengths, under the names the bundle holds
        assert chain["loras"] == [("lora1-lora_kohya.safetensors", 0.8), ("lora2-lora_kohya.safetensors", 0.6)]
        assert all((bundle / file).is_file() for file, _ in chain["loras"])
        # hires: latent upscale to the final size, then a second KSampler refining at denoise = strength
        first, refine = chain["samplers"]
        assert (refine["steps"], refine["denoise"], refine["seed"]) == (manifest.hires.refine_steps_run, 0.5, scene.seed)
        # best-of: the seed is the kept candidate's
        assert scene.seed == scene.scene_seed + scene.chosen_candidate * manifest.best_of.seed_stride
    upscales = [n["inputs"] for n in api.values() if n["class_type"] == "LatentUpscale"]
    assert len(upscales) == 8 and {(u["height"], u["width"]) for u in upscales} == {tuple(manifest.hires.final_size)}
    assert any(s.chosen_candidate for s in manifest.scenes)  # story selection kept another candidate somewhere
    card = (bundle / "README.md").read_text(encoding="utf-8")
    assert "## ComfyUI" in card and "`lora1-lora_kohya.safetensors` (in this bundle) | `models/loras/`" in card
    assert "`chatglm3-fp16.safetensors` | `models/LLM/`" in card and "KSampler `euler` / `normal`" in card
    assert "Hires: the project upscales the decoded image" in card and "Best of 2" in card
    assert manifest.config["comfyui"]["enabled"] is True  # what reproduce= renders again
    assert made["bundle"][0].workflow is not None  # the story folder got the workflow too


# ------------------------------------------------------------ the UI file and the PNGs: the same graph


def ui_to_api(ui: dict) -> dict:
    """What ComfyUI's frontend queues for a UI workflow: widget values by the declared input order (a
    seed's control value skipped), links resolved, frontend-only nodes (Note) left out."""
    links = {link[0]: link for link in ui["links"]}
    out = {}
    for node in ui["nodes"]:
        if node["type"] in SPEC["frontend_only"]:
            continue
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i.get("link") is not None}
        values, inputs = iter(node["widgets_values"]), {}
        for name, (kind, opts) in SPEC["nodes"][node["type"]]["input"]["required"].items():
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
            elif kind in WIDGET_TYPES:
                inputs[name] = next(values)
                if opts.get("control_after_generate"):
                    assert next(values) == "fixed"  # the seed stays as recorded when queued
        assert next(values, None) is None, f"node {node['id']}: widget values left over"
        out[str(node["id"])] = {"inputs": inputs, "class_type": node["type"]}
    return out


def ui_link_problems(ui: dict) -> list[str]:
    """Each link's type matches its ends, and both ends list it."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    problems = []
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        output, target = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        if not (output["type"] == target["type"] == kind and link_id in output["links"] and target["link"] == link_id):
            problems.append(f"link {link_id}: {output} -> {target}")
    return problems


@pytest.mark.parametrize("name", [*STORIES, "bundle"])
def test_ui_workflow_and_png_chunks_load_back_to_the_api_graph(made, name):
    api, ui, _, folder = _workflow(made, name)
    assert ui_to_api(ui) == {k: {"inputs": v["inputs"], "class_type": v["class_type"]} for k, v in api.items()}
    assert ui_link_problems(ui) == [] and ui["last_link_id"] == len(ui["links"])
    assert ui["last_node_id"] == max(n["id"] for n in ui["nodes"]) and ui["version"] == 0.4
    # a readable grid: the loaders in a column at the left, one column per scene
    x = {n["title"]: n["pos"][0] for n in ui["nodes"]}
    assert x["Kolors UNet"] == x["VAE (fp16-fix)"] == 0 < x["Scene 1 sampler"] < x["Scene 2 sampler"] < x["Scene 8 save"]
    note = next(n for n in ui["nodes"] if n["type"] == "Note")
    assert "not the same pixels" in note["widgets_values"][0]
    assert "not the same pixels" in next(n for n in api.values() if n["class_type"] == "MZ_KolorsUNETLoaderV2")["_meta"]["note"]
    if name == "warrior_dragon":
        return  # its PNGs are checked in the next test
    for n in range(1, 9):
        with Image.open(folder / f"{n}.png") as im:
            text = dict(im.text)
        assert json.loads(text["prompt"]) == api and json.loads(text["workflow"]) == ui
        assert json.loads(text["parameters"])["seed"] == scene_chains(api)[n]["samplers"][0]["seed"]


def test_a_story_without_comfyui_gets_the_graph_only_in_its_bundle(made, tmp_path):
    from kolors_story.generate.submission import write_bundle

    result, job = made["warrior_dragon"]
    assert result.workflow is None and not (result.out_dir / "workflow.json").exists()
    with Image.open(result.images[0]) as im:
        assert im.text["prompt"] == result.scenes[0].prompt and "workflow" not in im.text
    job = dataclasses.replace(job, submit=dataclasses.replace(job.submit, team="Late"))
    bundle = write_bundle(result, job, root=tmp_path)
    api, ui = (json.loads((bundle / f).read_text(encoding="utf-8")) for f in ("workflow_api.json", "workflow.json"))
    assert api == story_workflow(result.manifest, job.comfyui).api
    manifest = Manifest.read(bundle / "manifest.json")
    for scene, original in zip(manifest.scenes, result.images):
        with Image.open(bundle / scene.image) as im, Image.open(original) as before:
            assert json.loads(im.text["prompt"]) == api and json.loads(im.text["workflow"]) == ui
            assert np.array_equal(np.asarray(im), np.asarray(before))  # only the text changed
        assert manifest.images[scene.image] == scene.sha256 and scene.sha256 != result.manifest.images[scene.image]
    assert manifest.config["comfyui"]["enabled"] is True


# ---------------------------------------------------------------------- mapping, notes and settings


def test_every_scheduler_maps_to_a_comfyui_sampler_and_the_rest_warn():
    from kolors_story.generate.schedulers import SCHEDULERS

    ksampler = SPEC["nodes"]["KSampler"]["input"]["required"]
    assert set(COMFYUI_SAMPLERS) == set(SCHEDULERS)
    for name in SCHEDULERS:
        sampler_name, scheduler, warning = comfyui_sampler(name)
        assert sampler_name in ksampler["sampler_name"][1]["options"] and warning is None
        assert scheduler in ksampler["scheduler"][1]["options"]
    assert comfyui_sampler("dpmpp_2m_karras")[:2] == ("dpmpp_2m", "karras")
    assert comfyui_sampler("euler_karras")[:2] == ("euler", "karras")
    sampler_name, scheduler, warning = comfyui_sampler("restart")
    assert (sampler_name, scheduler) == ("euler", "normal") and "no ComfyUI equivalent" in warning
    assert "timestep_spacing" in comfyui_sampler("euler", {"timestep_spacing": "trailing"})[2]


def test_what_comfyui_cannot_express_is_named_in_the_graph_and_printed(made, capsys):
    from kolors_story.config import ComfyUISettings
    from kolors_story.generate.comfyui import warn
    from kolors_story.records import CoherenceRecord

    manifest = made["ink_dream"][0].manifest.model_copy(deep=True)
    manifest.coherence = CoherenceRecord.from_json({
        "sharing": {"references": [1], "strength": 1.0, "blocks": ["up_blocks"], "window": [0.0, 0.5],
                    "token_ratio": 0.5},
        "reference": {"scene": 1, "scales": [0.5] * 8}})
    manifest.sampler.scheduler = "restart"
    wf = story_workflow(manifest, ComfyUISettings(enabled=True))
    assert len(wf.warnings) == 3
    for text in ("no ComfyUI equivalent", "consistent self-attention", "IP-Adapter reference"):
        assert any(text in line for line in wf.warnings)
        assert text in next(n for n in wf.ui["nodes"] if n["type"] == "Note")["widgets_values"][0]
        assert text in wf.api["2"]["_meta"]["note"]
    warn(wf)
    assert capsys.readouterr().out.count("WARNING: ComfyUI workflow:") == 3


def test_comfyui_is_a_config_group_with_file_names_and_old_manifests_still_read(made):
    from kolors_story.config import ComfyUISettings, GenerateSettings, plain
    from kolors_story.config.compose import typed
    from kolors_story.errors import SettingsError
    from kolors_story.generate.comfyui import check_comfyui

    assert settings("generate", ["model=tiny"]).comfyui == ComfyUISettings(enabled=False)
    on = settings("generate", ["model=tiny", "comfyui=true", "comfyui.unet=kolors_unet.safetensors"]).comfyui
    assert (on.enabled, on.unet, on.lora) == (True, "kolors_unet.safetensors", "lora_kohya.safetensors")
    assert settings("generate", ["model=tiny", "comfyui.vae=v.safetensors"]).comfyui.vae == "v.safetensors"
    with pytest.raises(SettingsError, match=r"comfyui\.text_encoder=chatglm3\.bin: MZ_ChatGLM3Loader"):
        check_comfyui(ComfyUISettings(text_encoder="chatglm3.bin"))
    with pytest.raises(SettingsError, match="comfyui.lora is empty"):
        check_comfyui(ComfyUISettings(lora=""))
    older = plain(made["ink_dream"][1])
    older.pop("comfyui")  # a manifest written before this group existed still reproduces
    older["output_dir"] = "x"
    assert typed(older, GenerateSettings, lenient=True).comfyui == ComfyUISettings()


# ------------------------------------------------------------------------------------------ the docs


def mermaid(workflow, scenes: tuple[int, ...] = (1, 8)) -> str:
    """The docs' diagram of a story's graph: the shared loaders, the first and last scene, the rest elided."""
    def label(node) -> str:
        i = node.inputs
        detail = {"MZ_ChatGLM3Loader": i.get("chatglm3_checkpoint"), "MZ_KolorsUNETLoaderV2": i.get("unet_name"),
                  "VAELoader": i.get("vae_name"), "SaveImage": f"filename_prefix {i.get('filename_prefix')}",
                  "LoraLoaderModelOnly": f"{i.get('lora_name')} @ {i.get('strength_model')}",
                  "MZ_ChatGLM3_V2": node.title.rsplit(" ", 1)[-1],
                  "KSampler": f"seed {i.get('seed')} · {i.get('sampler_name')} / {i.get('scheduler')}"}.get(node.class_type)
        return f'n{node.id}["{node.class_type}' + (f"<br/>{detail}" if detail else "") + '"]'

    shown = [n for n in workflow.nodes if n.column == 0 or n.column in scenes]
    lines = ["flowchart LR"]
    for column in [0, *scenes]:
        name = "shared loaders" if column == 0 else f"scene {column}"
        lines += [f'    subgraph c{column}["{name}"]', *[f"        {label(n)}" for n in shown if n.column == column],
                  "    end"]
    lines.append(f'    more["scenes {scenes[0] + 1}-{scenes[-1] - 1}: the same chain, each with its prompts and seed"]')
    ids = {n.id for n in shown}
    for node in shown:
        lines += [f"    n{v.node} --> n{node.id}" for v in node.inputs.values() if getattr(v, "node", None) in ids]
    loaders = [n.id for n in shown if n.column == 0 and n.class_type != "MZ_KolorsUNETLoaderV2"]
    lines.append("    " + " & ".join(f"n{i}" for i in loaders) + " -.-> more")
    return "\n".join(lines)


def test_docs_page_shows_the_real_graph_and_the_tables(made):
    page = (REPO / "docs" / "comfyui.md").read_text(encoding="utf-8")
    result, job = made["idol_diary"]
    diagram = mermaid(story_workflow(result.manifest, job.comfyui))
    assert f"```mermaid\n{diagram}\n```" in page, f"docs/comfyui.md should show this diagram:\n{diagram}"
    for name, (sampler_name, scheduler) in COMFYUI_SAMPLERS.items():
        assert re.search(rf"\| `{name}` \| `{sampler_name}` \| `{scheduler}` \|", page), name
    defaults = settings("generate", ["model=tiny"]).comfyui
    for key, folder in (("unet", "models/unet/"), ("text_encoder", "models/LLM/"), ("vae", "models/vae/"),
                        ("lora", "models/loras/")):
        assert re.search(rf"\| `comfyui\.{key}` \| `{re.escape(getattr(defaults, key))}` \| `{folder}", page), key
    assert "not the same pixels" in page
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    assert "      - Reproducibility and submission: reproducibility.md\n      - ComfyUI: comfyui.md\n" in nav
    assert "(docs/comfyui.md)" in (REPO / "README.md").read_text(encoding="utf-8")
