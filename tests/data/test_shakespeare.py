"""The speaker parser on hand-made snippets of each layout, then the real corpus."""

from __future__ import annotations

from collections import Counter

import pytest

from fedfit.data import load_dataset, shakespeare
from fedfit.data.shakespeare import Speech, parse_play, strip_directions

MODERN = """\
HAMLET

by William Shakespeare

PERSONS REPRESENTED.

Hamlet, Prince.
Horatio, his friend.

ACT I.

Scene I. Elsinore. A platform.

[Enter Horatio and
Hamlet.]

Ham.
Who's there?

Hor.
Friends to this ground.

Ham.
Stand, ho!
[Aside.] Who is there?

[Exit Horatio.]

Stay, illusion!

Hor.
Farewell.

SCENE II.

The same. A room.

Stray line nobody speaks.

HAMLET. O that this too too solid flesh
would melt.
"""


def test_modern_layout() -> None:
    play = parse_play(MODERN)
    assert play.speeches == [
        Speech("HAM", "Who's there?", 17),
        Speech("HOR", "Friends to this ground.", 20),
        # the aside is cut out; the turn goes on after the exit of somebody else
        Speech("HAM", "Stand, ho!\nWho is there?\nStay, illusion!", 23),
        Speech("HOR", "Farewell.", 31),
        # inline tag, capitals
        Speech("HAMLET", "O that this too too solid flesh\nwould melt.", 40),
    ]
    # the front matter is skipped, the location line belongs to its heading
    assert play.unattributed_at == [38]
    assert play.heading_lines == 4  # ACT I., Scene I., SCENE II., The same. A room.
    assert play.direction_lines == 3  # the two-line [Enter ...] and [Exit Horatio.]
    assert play.attributed_lines == 8


VARIANTS = """\
ACT I.

SCENE I. Windsor.

THESEUS
Now, fair Hippolyta.

MRS. PAGE.
What, have I scaped love-letters?

SECOND LORD.

[Aside.]

No, faith; not so much as his patience.

1 Citizen.
Peace, ho!

1 Citizen.
Peace!

AMIENS.
SONG.
Under the greenwood tree
II.
Who doth ambition shun

THE END
"""


def test_tag_variants() -> None:
    play = parse_play(VARIANTS)
    assert [(s.role, s.text) for s in play.speeches] == [
        ("THESEUS", "Now, fair Hippolyta."),  # no period after the tag
        ("MRS. PAGE", "What, have I scaped love-letters?"),  # period inside the tag
        ("SECOND LORD", "No, faith; not so much as his patience."),  # tag, blank, direction
        ("1 CITIZEN", "Peace, ho!"),
        ("1 CITIZEN", "Peace!"),
        ("AMIENS", "Under the greenwood tree\nII.\nWho doth ambition shun"),  # stanza no speaker
    ]
    assert play.unattributed_lines == 0


FOLIO = """\
Actus Primus. Scoena Prima.

Enter young Bertram Count of Rossillion, his Mother, and Helena,
Lord Lafew, all in blacke.

  Mother. In deliuering my sonne from me, I burie a second husband

   Ros. And I in going Madam, weep ore my
fathers death anew

   Laf. You shall find of the King a husband Madame,
you sir a father

   Mo. What hope is there of his Maiesties amendment?

   Laf. He hath abandon'd his Phisitions Madam
"""


def test_folio_layout_indented_inline_tags() -> None:
    play = parse_play(FOLIO)
    assert [(s.role, s.text) for s in play.speeches] == [
        ("MOTHER", "In deliuering my sonne from me, I burie a second husband"),
        ("ROS", "And I in going Madam, weep ore my\nfathers death anew"),
        ("LAF", "You shall find of the King a husband Madame,\nyou sir a father"),
        ("MO", "What hope is there of his Maiesties amendment?"),
        ("LAF", "He hath abandon'd his Phisitions Madam"),
    ]
    assert play.direction_lines == 2  # the bare two-line "Enter ..."
    assert play.unattributed_lines == 0


def test_mixed_case_line_is_no_tag_unless_seen_twice() -> None:
    text = "ACT I.\n\nBRUTUS.\nCome.\n\n[Exit Cassius.]\n\nFarewell.\nThe games are done.\n"
    play = parse_play(text)
    assert play.speeches == [Speech("BRUTUS", "Come.\nFarewell.\nThe games are done.", 3)]


def test_poem_is_not_a_play() -> None:
    with pytest.raises(ValueError, match="not a play"):
        parse_play("SONNETS\n\nI\n\nFrom fairest creatures we desire increase,\n")


def test_strip_directions() -> None:
    lines = [
        "Is general woe.--[To Kent.] Friends",
        "[Enter",
        "a Knight.]",
        "",
        "[unclosed",
        "",
        "x",
    ]
    assert strip_directions(lines) == ["Is general woe.-- Friends", "", "", "", "", "", "x"]


@pytest.fixture(scope="module")
def parsed() -> dict[str, shakespeare.ParsedPlay]:
    return shakespeare.parse_all()[0]


@pytest.mark.real
def test_real_corpus(parsed: dict[str, shakespeare.ParsedPlay]) -> None:
    ds = load_dataset("shakespeare")
    st = ds.stats
    assert (st["plays"], st["poems_skipped"]) == (37, 5)
    # every non-empty body line is attributed, a heading, or a direction, bar a handful
    assert st["unattributed_lines"] < 0.001 * st["attributed_lines"]
    assert 100_000 < st["attributed_lines"] < 110_000
    assert 1_200 < st["roles"] < 1_500
    assert 400 < st["roles_with_2k_chars"] < 600
    assert ds.task == "lm" and ds.train_labels is None and ds.label_names == ()
    assert len(ds.train_groups) == len(ds.train_texts)  # type: ignore[arg-type]
    # reference: Hamlet speaks about 11,600 words (Open Source Shakespeare counts 11,563)
    hamlet = [s.text for s in parsed["hamlet"].speeches if s.role == "HAM"]
    assert 11_000 < sum(len(t.split()) for t in hamlet) < 12_000


@pytest.mark.real
def test_real_split_holds_out_last_tenth_of_each_role(
    parsed: dict[str, shakespeare.ParsedPlay],
) -> None:
    ds = load_dataset("shakespeare")
    plays = parsed
    hamlet = [s.text for s in plays["hamlet"].speeches if s.role == "HAM"]
    cut = len(hamlet) - len(hamlet) // 10
    train = [t for t, g in zip(ds.train_texts, ds.train_groups, strict=True) if g == "hamlet/HAM"]  # type: ignore[arg-type]
    assert train == hamlet[:cut]
    test_start = ds.test_texts.index(hamlet[cut])
    assert ds.test_texts[test_start : test_start + len(hamlet) - cut] == hamlet[cut:]
    # every role keeps n - floor(n / 10) speeches for training, so every role is a client
    by_group = Counter(f"{stem}/{s.role}" for stem, play in plays.items() for s in play.speeches)
    assert Counter(ds.train_groups) == {g: n - n // 10 for g, n in by_group.items()}
    assert len(ds.test_texts) == sum(n // 10 for n in by_group.values())
