"""Character-level text for the language-model workloads, found offline.

By default the corpus is the installed Python standard library's own source
(``*.py`` directly under ``sysconfig``'s stdlib directory, sorted by name,
then those of its packages, read until ``size`` characters; installed
packages are left out): present on every machine that runs Python, no
download. ``--text FILE`` (UTF-8) replaces it.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_SIZE = 300_000
_INSTALLED = frozenset({"site-packages", "dist-packages"})  # other packages' source: it differs from machine to machine


class TextTooShort(ValueError):
    """A text too short for the language model or its windows; the message says how long it must be."""


def stdlib_source(size: int = DEFAULT_SIZE) -> str:
    """About ``size`` characters of the standard library's Python source."""
    directory = Path(sysconfig.get_paths()["stdlib"])
    nested = (
        p for p in directory.rglob("*.py") if p.parent != directory and not _INSTALLED.intersection(p.relative_to(directory).parts)
    )
    parts, total = [], 0
    for path in [*sorted(directory.glob("*.py")), *sorted(nested)]:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= size:
            break
    if not parts:
        raise FileNotFoundError(f"no Python sources under {directory}: pass a text file with --text")
    return "".join(parts)[:size]


@dataclass
class CharCorpus:
    """A text as character ids, split into a training and a held-out part (the last 10%)."""

    vocab: list[str]
    train: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_text(cls, text: str, valid_fraction: float = 0.1) -> "CharCorpus":
        if len(text) < 1000:
            raise TextTooShort(f"the text has {len(text)} characters; a language model needs at least 1000")
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        split = int((1.0 - valid_fraction) * len(ids))
        return cls(vocab, ids[:split], ids[split:])

    @classmethod
    def load(cls, path: Path | None = None, size: int = DEFAULT_SIZE) -> "CharCorpus":
        """``path`` (UTF-8, its characters as the file holds them) or, when ``None``, the standard library's source."""
        # the bytes decoded as they are: read_text's universal newlines turned each "\r\n" and lone "\r" into "\n"
        text = path.read_bytes().decode("utf-8") if path is not None else stdlib_source(size)
        return cls.from_text(text)

    @staticmethod
    def windows(ids: torch.Tensor, context: int, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``ids[s:s+context]`` and next-character targets ``ids[s+1:s+context+1]``."""
        offsets = starts.unsqueeze(1) + torch.arange(context + 1, device=starts.device)
        chunk = ids[offsets]
        return chunk[:, :-1], chunk[:, 1:]
