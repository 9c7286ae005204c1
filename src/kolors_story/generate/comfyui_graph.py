"""A ComfyUI graph and its two file formats: the nodes and links, each node type's slots (the input
order ComfyUI declares, read from ComfyUI's ``nodes.py`` and ComfyUI-Kolors-MZ's ``__init__.py``), the
API format (``workflow_api.json``) and the UI format (``workflow.json``) laid out as a grid: the shared
loaders and the notes in a column at the left, one column per scene."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CONTROL = "control_after_generate"  # the UI's widget after a seed: "fixed" keeps the seed when queued
UI_VERSION = 0.4  # the LiteGraph serialization ComfyUI's frontend saves and loads


@dataclass(frozen=True)
class Link:
    """An input fed by another node's output: ``[node id, output index]`` in the API format."""

    node: int
    output: int = 0


@dataclass
class Node:
    """One node: its inputs (widget values and links) by name, its title, its column in the UI grid."""

    id: int
    class_type: str
    inputs: dict[str, Any]
    title: str
    column: int  # 0: the shared loaders; n: scene n


@dataclass(frozen=True)
class Slots:
    """What the UI format needs of a node type: widgets in order, linked inputs, outputs, a size."""

    widgets: tuple[str, ...]
    inputs: tuple[tuple[str, str], ...]  # (name, type) of the inputs a link feeds
    outputs: tuple[tuple[str, str], ...]  # (name, type)
    size: tuple[int, int]


SLOTS = {
    "MZ_ChatGLM3Loader": Slots(("chatglm3_checkpoint",), (), (("chatglm3_model", "CHATGLM3MODEL"),), (315, 58)),
    "MZ_ChatGLM3_V2": Slots(("text",), (("chatglm3_model", "CHATGLM3MODEL"),), (("CONDITIONING", "CONDITIONING"),),
                            (400, 160)),
    "MZ_KolorsUNETLoaderV2": Slots(("unet_name",), (), (("model", "MODEL"),), (315, 58)),
    "LoraLoaderModelOnly": Slots(("lora_name", "strength_model"), (("model", "MODEL"),), (("MODEL", "MODEL"),),
                                 (315, 82)),
    "VAELoader": Slots(("vae_name",), (), (("VAE", "VAE"),), (315, 58)),
    "EmptyLatentImage": Slots(("width", "height", "batch_size"), (), (("LATENT", "LATENT"),), (315, 106)),
    "KSampler": Slots(("seed", CONTROL, "steps", "cfg", "sampler_name", "scheduler", "denoise"),
                      (("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                       ("latent_image", "LATENT")), (("LATENT", "LATENT"),), (315, 262)),
    "LatentUpscale": Slots(("upscale_method", "width", "height", "crop"), (("samples", "LATENT"),),
                           (("LATENT", "LATENT"),), (315, 130)),
    "VAEDecode": Slots((), (("samples", "LATENT"), ("vae", "VAE")), (("IMAGE", "IMAGE"),), (210, 46)),
    "SaveImage": Slots(("filename_prefix",), (("images", "IMAGE"),), (), (315, 270)),
}
NOTE_SIZE = (400, 420)
COLUMN_WIDTH, GAP, TITLE = 420, 60, 30  # px; a node's title bar sits above its pos


def api_workflow(nodes: list[Node], notes: list[str]) -> dict:
    """ComfyUI's API format: ``{id: {inputs, class_type, _meta}}``, links as ``[id, output]``. It has no
    note nodes: the notes ride in the UNet loader's ``_meta`` (ComfyUI reads only ``_meta.title``)."""
    out = {}
    for node in nodes:
        inputs = {k: [str(v.node), v.output] if isinstance(v, Link) else v for k, v in node.inputs.items()}
        meta: dict[str, Any] = {"title": node.title}
        if node.class_type == "MZ_KolorsUNETLoaderV2":
            meta["note"] = "\n".join(notes)
        out[str(node.id)] = {"inputs": inputs, "class_type": node.class_type, "_meta": meta}
    return out


def _positions(nodes: list[Node]) -> dict[int, tuple[int, int]]:
    """Top-left of each node: the column's x, stacked downwards in the order the nodes were added."""
    y_of: dict[int, int] = {}
    out = {}
    for node in nodes:
        x = node.column * (COLUMN_WIDTH + GAP)
        y = y_of.get(node.column, 0)
        out[node.id] = (x, y)
        y_of[node.column] = y + SLOTS[node.class_type].size[1] + TITLE + GAP // 2
    return out


def _links(nodes: list[Node]) -> list[list]:
    """``[link id, from node, from slot, to node, to slot, type]`` for every linked input, in node order."""
    links = []
    for node in nodes:
        for slot, (name, kind) in enumerate(SLOTS[node.class_type].inputs):
            source = node.inputs[name]
            links.append([len(links) + 1, source.node, source.output, node.id, slot, kind])
    return links


def _ui_node(node: Node, order: int, pos: tuple[int, int], links: list[list]) -> dict:
    slots = SLOTS[node.class_type]
    into = {(lk[3], lk[4]): lk[0] for lk in links}
    inputs = [{"name": name, "type": kind, "link": into[(node.id, slot)]}
              for slot, (name, kind) in enumerate(slots.inputs)]
    outputs = [{"name": name, "type": kind, "slot_index": slot,
                "links": [lk[0] for lk in links if lk[1] == node.id and lk[2] == slot]}
               for slot, (name, kind) in enumerate(slots.outputs)]
    widgets = ["fixed" if name == CONTROL else node.inputs[name] for name in slots.widgets]
    return {"id": node.id, "type": node.class_type, "title": node.title, "pos": list(pos), "size": list(slots.size),
            "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node.class_type}, "widgets_values": widgets}


def _groups(nodes: list[Node], pos: dict[int, tuple[int, int]], title: str) -> list[dict]:
    """A frame around each column: the shared loaders, then one per scene."""
    groups = []
    for column in sorted({n.column for n in nodes}):
        members = [n for n in nodes if n.column == column]
        x = pos[members[0].id][0]
        bottom = max(pos[n.id][1] + SLOTS[n.class_type].size[1] for n in members)
        label = f"{title}: shared loaders" if column == 0 else f"Scene {column}"
        groups.append({"title": label, "bounding": [x - 15, -TITLE - 50, COLUMN_WIDTH, bottom + TITLE + 65],
                       "color": "#3f789e", "font_size": 24, "flags": {}})
    return groups


def ui_workflow(nodes: list[Node], notes: list[str], title: str) -> dict:
    """ComfyUI's UI format (what "Load" opens and what it embeds in its own PNGs): the same nodes, ids and
    links as the API format, positioned in columns, plus a ``Note`` node (a frontend-only node) with the notes."""
    pos = _positions(nodes)
    links = _links(nodes)
    ui_nodes = [_ui_node(node, order, pos[node.id], links) for order, node in enumerate(nodes)]
    note_id = len(nodes) + 1
    below = max(pos[n.id][1] + SLOTS[n.class_type].size[1] for n in nodes if n.column == 0) + TITLE + GAP
    ui_nodes.append({"id": note_id, "type": "Note", "title": "kolors-story: how this graph maps the story",
                     "pos": [0, below], "size": list(NOTE_SIZE), "flags": {}, "order": len(nodes), "mode": 0,
                     "inputs": [], "outputs": [], "properties": {"text": ""}, "widgets_values": ["\n\n".join(notes)],
                     "color": "#432", "bgcolor": "#653"})
    groups = _groups(nodes, pos, title)
    return {"last_node_id": note_id, "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": groups, "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [60, 120]}},
            "version": UI_VERSION}
