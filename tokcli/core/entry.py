"""What the registry knows about a named model before any weights are read: plain data, JSON-friendly, torch-free
(`tok models` reads every entry without importing torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tokcli.errors import TokError


@dataclass(frozen=True)
class HubFile:
    """One file of an official release on the Hugging Face Hub.

    ``role`` tells the family's converter what the file is (``checkpoint`` for the main file; e.g. ``quantizer``,
    ``base_vae``, ``base_vae_config`` for the others); ``local`` is where the file goes, relative to the folder of
    the main checkpoint, when a user lays out downloaded copies for ``tok convert FILE --as NAME``."""

    repo: str
    filename: str
    revision: str | None = None
    role: str = "checkpoint"
    local: str | None = None

    @property
    def spec(self) -> str:
        """``repo:filename[@revision]``, the form error messages use."""
        return f"{self.repo}:{self.filename}" + (f"@{self.revision}" if self.revision else "")

    @property
    def local_name(self) -> str:
        return self.local or self.filename.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ModelEntry:
    """A named model: family, architecture (``model_args``), where its weights come from, what the paper reports."""

    name: str
    family: str
    description: str
    model_args: dict[str, Any] = field(default_factory=dict)
    # Official release (for `tok convert NAME`): Hub repo + file + revision.
    hub_repo: str | None = None
    hub_filename: str | None = None
    hub_revision: str | None = None
    # Further files the conversion needs (a release spread over several files or repos): one object per file with
    # the keys of HubFile (repo, filename, and optionally revision, role, local).
    extra_hub_files: tuple[dict[str, Any], ...] = ()
    license: str = "unknown"
    paper: str = ""
    paper_metrics: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    shipped: bool = False  # a folder shipped with the package (tokcli/weights/NAME)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["extra_hub_files"] = [dict(f) for f in self.extra_hub_files]
        return d

    def release_files(self) -> list[HubFile]:
        """Every Hub file `tok convert NAME` needs: the main checkpoint first, then ``extra_hub_files``."""
        if not self.hub_repo or not self.hub_filename:
            return []
        out = [HubFile(self.hub_repo, self.hub_filename, self.hub_revision)]
        for d in self.extra_hub_files:
            try:
                f = HubFile(**d)
            except TypeError as e:
                raise TokError(f"registry entry {self.name}: bad extra_hub_files item {d!r} ({e})") from None
            out.append(f if "role" in d else replace(f, role=f.filename))
        roles = [f.role for f in out]
        if len(set(roles)) != len(roles):
            raise TokError(f"registry entry {self.name}: two release files share a role ({roles})")
        return out

    def local_convert_hint(self) -> str:
        """How to convert downloaded copies of the release instead (``tok convert FILE --as NAME``)."""
        files = self.release_files()
        if not files:
            return ""
        main = files[0].local_name
        if len(files) == 1:
            return f"`tok convert PATH/{main} --as {self.name}`"
        layout = ", ".join(f"FOLDER/{f.local_name}" for f in files)
        return f"`tok convert FOLDER/{main} --as {self.name}` with the files laid out as {layout}"
