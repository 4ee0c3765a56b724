"""What every generator's ``tok train`` objective shares: a token file as the data, the architecture completed from
its header, the class count checked against its labels, and an exported folder that names the tokenizer the file
came from (so ``tok generate`` decodes through exactly that model).

A generator objective subclasses :class:`GeneratorObjective` and says what is its own: the model class
(:meth:`model_class`), what the token file fixes in ``model_args`` (:meth:`args_from_data`, built with
:meth:`check_given` and :meth:`class_count`), the loss and the card text.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tokcli.errors import TokUsageError
from tokcli.train.objective import Objective
from tokcli.train.token_data import TokenData, ensure_tokens


class GeneratorObjective(Objective):
    data = "tokens"
    #: the reader of the token file (SiT reads latents with its own subclass)
    token_data: type[TokenData] = TokenData
    #: the ``model_args`` key of the number of classes (the official WeTok AR code calls it ``class_num``)
    classes_key = "num_classes"

    def prepare(self) -> None:
        """Encode the crops when the recipe asks for it, then read the token file's header and labels."""
        ensure_tokens(self.recipe.data, self.recipe.run.seed, device=str(self.device))
        self.tokens = self.token_data(self.recipe.data, seed=self.recipe.run.seed)

    def make_data(self, rank: int = 0, world_size: int = 1):
        return self.tokens.for_rank(rank, world_size)  # the file prepare() read, not a second read

    # --- the architecture -----------------------------------------------------------------------------------
    def model_class(self) -> type[nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    def args_from_data(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """The recipe's ``model_args`` completed from the token file."""
        raise NotImplementedError

    def check_given(self, found: dict[str, Any], what: str = "") -> None:
        """Refuse a recipe key that repeats one the token file fixes with another value (``what``: a hint on the
        file's layout, appended to the message)."""
        given, path = self.recipe.model.model_args, self.tokens.path
        for k, v in found.items():
            if k in given and given[k] != v:
                raise TokUsageError(f"{self.recipe.source}: model_args.{k} = {given[k]!r} but the token file "
                                    f"{path} has {v!r}{what}")

    def class_count(self) -> int:
        """The number of classes: the recipe's (at least the labels' classes), else the labels'; 1 for a file
        without labels, where asking for more (a conditional model without labels) is refused."""
        d, key = self.tokens, self.classes_key
        classes = d.num_classes if d.has_labels else 1
        want = self.recipe.model.model_args.get(key, classes)
        if not d.has_labels and want != 1:
            raise TokUsageError(f"{d.path} has no labels but model_args.{key} = {want} asks for a conditional "
                                f"generator: encode with tok encode --labels folder (or {key} = 1)")
        if isinstance(want, int) and want < classes:
            raise TokUsageError(f"{self.recipe.source}: model_args.{key} = {want} but {d.path} has labels "
                                f"0..{classes - 1}")
        return want

    def build_model(self, model_args: dict | None) -> nn.Module:
        """The model of ``model_args`` (a checkpoint's), else of the recipe completed from the token file (the
        recipe's alone before :meth:`prepare`: a recipe that spells out the token layout builds without data)."""
        if model_args is None:
            model_args = self.args_from_data() if hasattr(self, "tokens") else dict(self.recipe.model.model_args)
        return self.model_class()(**model_args)

    def build_networks(self, model_args: dict | None) -> dict[str, nn.Module]:
        return {"model": self.build_model(model_args)}

    # --- export ---------------------------------------------------------------------------------------------
    @property
    def tokenizer_ref(self) -> dict[str, Any]:
        h = self.tokens.header
        return {"name": h.get("model"), "sha256": h.get("model_sha256")}

    def export_model(self, state, data) -> nn.Module:
        model = self.model
        model.tokenizer_ref = self.tokenizer_ref
        return model

    def class_names(self) -> str:
        """": a, b, c..." (the first 20 class names) for the card, or "" when the file names no classes."""
        classes = self.tokens.classes
        if not classes:
            return ""
        return ": " + ", ".join(classes[:20]) + ("..." if len(classes) > 20 else "")

    def tokenizer_line(self, what: str) -> str:
        """The card's opening: which tokenizer's ``what`` the model samples."""
        r = self.tokenizer_ref
        return f"Samples the {what} of the tokenizer `{r['name']}` (weights sha256 `{r['sha256']}`)"

    def training_record(self) -> dict[str, Any]:
        return {"classes": self.tokens.classes, "tokenizer": self.tokenizer_ref}
