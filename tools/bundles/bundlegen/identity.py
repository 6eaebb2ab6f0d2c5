"""``train#run_identity`` of both families: the settings that make a training run this run, saved in every full
checkpoint; ``--resume true`` continues only checkpoints with the same identity
(``hybridmim_components.workflow.run_identity``).

Each setting references the config in effect (``@network_def#features``, ``@optimizer#lr``), so a command-line
override of the key itself or of what it references counts. Left out on purpose, because a resume may change them:
``max_epochs`` (the schedule continues to the new end), loader workers, device, AMP, output folders, the pretrained
weights (a resume loads the checkpoint, never ``pretrained_path``), gradient checkpointing, data checks.
"""
from __future__ import annotations

from tools.bundles.bundlegen.common import WORKFLOW

__all__ = ["CHANGED_SETTINGS", "run_identity", "loader_keys", "unless_resuming"]

# the top-level key that continues a run with changed settings on purpose (false: only the same run is resumed)
CHANGED_SETTINGS = {"resume_changed_settings": False}

# network keys that change memory or speed, not what is computed
_NOT_IDENTITY = {"_target_", "use_checkpoint"}


def _component(name: str, node: dict) -> dict:
    """``{name: target, name#key: @name#key, ...}`` for a config component's arguments."""
    settings = {name: node["_target_"]}
    for key, value in node.items():
        if key in _NOT_IDENTITY or key in ("params", "optimizer"):
            continue
        # an expression (e.g. the merging order's resolver) is named by what it reads, not by its result
        settings[f"{name}#{key}"] = "@downsample" if key == "downsample" else f"@{name}#{key}"
    return settings


def run_identity(data: str, network_def: dict, loss: dict, optimizer: dict, extra: dict) -> dict:
    """The ``train#run_identity`` component.

    Args:
        data: expression of the data's identity (``datalist_identity`` of the whole datalist, not a DDP shard: the
            number of processes may change on a resume).
        network_def, loss, optimizer: the config components (their arguments are referenced one by one).
        extra: other settings, name -> reference (seed, preprocessing, crops, masking, batch, warm-up).
    """
    settings = {"data": data, **_component("network_def", network_def), **_component("loss", loss),
                **_component("optimizer", optimizer), **extra}
    return {"_target_": f"{WORKFLOW}.RunIdentity", "settings": settings}


def loader_keys() -> dict:
    """Arguments of ``ResumeFromLatestCheckpoint`` beside its ``load_dict``: resume only this run's checkpoints."""
    return {
        "identity": "@train#run_identity",
        "resume_changed_settings": "$hybridmim_components.workflow.config_flag(@resume_changed_settings, "
                                   "'resume_changed_settings')",
    }


def unless_resuming(call: str) -> str:
    """An ``initialize`` entry (``"$..."``) that loads the pretrained weights, skipped (logged) when the run resumes
    from a checkpoint: a resume needs nothing outside its own folder."""
    assert call.startswith("$")
    return "$None if @train#checkpoint_loader.skips_pretrained(@pretrained_path) else " + call[1:]
