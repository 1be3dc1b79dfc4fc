"""Hugging Face Hub-style saving and loading for every pixelwise model, through huggingface_hub's
``PyTorchModelHubMixin`` (as segmentation-models-pytorch does).

``model.save_pretrained(dir)`` writes the folder the Hub expects:

* ``model.safetensors``: the tensors, with pixelwise's weights metadata in its header (builder name and
  arguments, classes, palette, mean/std, ignore index: ``pixelwise.weights``), so the folder is also what
  ``pixelwise evaluate|predict|serve --weights DIR`` reads;
* ``config.json``: the same metadata as JSON, for the Hub and for people reading the repository;
* ``README.md``: the mixin's model card.

``from_pretrained(dir_or_repo_id)`` loads through ``pixelwise.weights.load_weights`` (schema, shapes and a
strict load checked), so nothing reaches a builder unchecked; a Hub repository id is downloaded by
huggingface_hub (its cache, ``revision``, ``token``, ``local_files_only``). ``push_to_hub(repo_id)``
is the mixin's own. huggingface_hub is optional (``pip install 'pixelwise[hub]'``): the model classes
import without it and only these methods need it.

The mixin builds a model by calling its class with the recorded ``__init__`` arguments; pixelwise
models are built by keyword-only builder functions instead (``MODELS``), so the mixin carries the
model (``_carrier``) and every model class inherits the small `HubMixin` below, which hands over to it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch.nn as nn

from pixelwise.errors import UserError

WEIGHTS_FILE = "model.safetensors"  # huggingface_hub's constants.SAFETENSORS_SINGLE_FILE
CONFIG_FILE = "config.json"  # huggingface_hub's constants.CONFIG_NAME


class HubMixin:
    """``save_pretrained``, ``from_pretrained`` and ``push_to_hub`` for a pixelwise model.

    Attributes:
        builder: (builder name, its keyword arguments) when the model was built by
            ``pixelwise.models.get_model`` (and so by ``load_weights``, ``from_pretrained`` and torch.hub),
            else None; what ``save_pretrained`` records.
        weights_meta: the ``WeightsMeta`` the model was loaded with (classes, palette, mean/std), or None;
            ``save_pretrained`` keeps them unless told otherwise.
    """

    builder: tuple[str, dict[str, Any]] | None = None  # set on the instance by get_model
    weights_meta: Any = None  # set on the instance by load_weights

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        classes: list[str] | None = None,
        palette: list[tuple[int, int, int]] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        **hub_kwargs: Any,
    ) -> str | None:
        """Write ``model.safetensors``, ``config.json`` and a model card into `save_directory`.

        Args:
            classes, palette, mean, std: the metadata to store; by default the loaded weights' own, else
                ``class0..classK-1``, a default palette and ImageNet's mean/std.
            hub_kwargs: the mixin's (``push_to_hub=True, repo_id=...``, ``model_card_kwargs``).
        """
        carrier = _carrier()(model=self, config=self._hub_config(classes, palette, mean, std))
        return carrier.save_pretrained(save_directory, **hub_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        classes: list[str] | None = None,
        palette: list[tuple[int, int, int]] | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        **hub_kwargs: Any,
    ) -> str:
        """Upload the folder ``save_pretrained`` writes to the Hub repository `repo_id` (huggingface_hub's
        ``push_to_hub``: ``private``, ``token``, ``branch``, ``commit_message``, ...); returns the commit URL."""
        carrier = _carrier()(model=self, config=self._hub_config(classes, palette, mean, std))
        return carrier.push_to_hub(repo_id, **hub_kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **hub_kwargs: Any) -> nn.Module:
        """The model saved in a local folder or a Hub repository, in eval mode.

        Args:
            pretrained_model_name_or_path: a folder written by ``save_pretrained``, or a Hub repository id
                ("user/name").
            hub_kwargs: the mixin's: ``map_location`` ("cpu"), ``revision``, ``cache_dir``, ``token``,
                ``force_download``, ``local_files_only``.
        """
        where = pretrained_model_name_or_path
        try:
            model = _carrier().from_pretrained(where, **hub_kwargs).model
        except (UserError, ModuleNotFoundError, TypeError):
            raise
        except Exception as e:  # huggingface_hub's: no network, no such repository, not a repository id
            if Path(where).exists():
                raise
            raise UserError(
                f"{where}: no such folder, and the Hub does not give it ({type(e).__name__}: {_short(e)}); "
                "check the path or the repository id"
            ) from None
        if not isinstance(model, cls):
            raise UserError(
                f"{pretrained_model_name_or_path}: holds a {type(model).__name__} "
                f"({model.builder[0]}), not a {cls.__name__}; load it with pixelwise.models.from_pretrained"
            )
        return model

    def _hub_config(
        self,
        classes: list[str] | None,
        palette: list[tuple[int, int, int]] | None,
        mean: tuple[float, ...] | None,
        std: tuple[float, ...] | None,
    ) -> dict[str, Any]:
        """The weights metadata as a JSON object: what config.json holds and model.safetensors' header repeats."""
        from pixelwise.inference import IMAGENET_MEAN, IMAGENET_STD
        from pixelwise.weights import meta_for

        if self.builder is None:
            raise UserError(
                f"save_pretrained: this {type(self).__name__} does not record its builder; build it with "
                "pixelwise.models.get_model(name, ...) (or torch.hub.load, from_pretrained, load_weights)"
            )
        name, kwargs = self.builder
        loaded = self.weights_meta
        num_classes = kwargs.get("num_classes", loaded.num_classes if loaded else None)
        meta = meta_for(
            model_name=name,
            model_kwargs=kwargs,
            classes=classes or (loaded.classes if loaded else [f"class{i}" for i in range(num_classes)]),
            palette=palette or (loaded.palette if loaded and not classes else None),
            mean=mean or (loaded.mean if loaded else IMAGENET_MEAN),
            std=std or (loaded.std if loaded else IMAGENET_STD),
            ignore_index=loaded.ignore_index if loaded else 255,
            extra=loaded.extra if loaded else None,
        )
        return json.loads(json.dumps(asdict(meta)))  # tuples as lists: what reading config.json gives back


@functools.cache
def _carrier() -> type:
    """The `PyTorchModelHubMixin` subclass that carries one pixelwise model (built on first use)."""
    try:
        from huggingface_hub import PyTorchModelHubMixin
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "save_pretrained, from_pretrained and push_to_hub need the package 'huggingface_hub': "
            "pip install 'pixelwise[hub]'",
            name="huggingface_hub",
        ) from None

    class PixelwiseHub(
        PyTorchModelHubMixin,
        library_name="pixelwise",
        pipeline_tag="image-segmentation",
        tags=["pixelwise", "semantic-segmentation"],
    ):
        """One pixelwise model and its weights metadata (`config`, which the mixin writes to config.json)."""

        def __init__(self, model: nn.Module, config: dict[str, Any]) -> None:
            self.model = model  # the mixin records `config` as this instance's config.json

        def _save_pretrained(self, save_directory: Path) -> None:
            from pixelwise.weights import save_weights

            save_weights(Path(save_directory) / WEIGHTS_FILE, self.model, **self._hub_mixin_config)

        @classmethod
        def _from_pretrained(
            cls, *, model_id: str, config: dict[str, Any] | None, map_location: str = "cpu", **download: Any
        ) -> PixelwiseHub:
            from pixelwise.weights import load_weights

            file = _weights_file(model_id, download)
            model, meta = load_weights(file, map_location)
            stored = json.loads(json.dumps(asdict(meta)))
            if config is not None and config != stored:
                raise UserError(
                    f"{model_id}: {CONFIG_FILE} and {WEIGHTS_FILE} describe different models; "
                    "save the folder again with save_pretrained"
                )
            return cls(model=model, config=stored)

    return PixelwiseHub


def _weights_file(model_id: str, download: dict[str, Any]) -> Path:
    """`model_id`'s model.safetensors: in the folder `model_id`, or downloaded from that Hub repository."""
    folder = Path(model_id)
    if folder.is_dir():
        return folder / WEIGHTS_FILE
    from huggingface_hub import hf_hub_download

    keys = ("revision", "cache_dir", "force_download", "local_files_only", "token")
    return Path(hf_hub_download(repo_id=model_id, filename=WEIGHTS_FILE, **{k: download[k] for k in keys}))


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]
