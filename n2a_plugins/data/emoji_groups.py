"""Unicode emoji groups and the names Python's `unicodedata` does not know yet.

`GROUP_RANGES` gives, for the code points OpenMoji draws, the group of the Unicode emoji
ordering (emoji-test.txt, Unicode Technical Standard #51) they are listed under, e.g.
U+1F34E RED APPLE -> food-drink. A sequence (skin tone, ZWJ, keycap) takes the group of
its first code point, as emoji-test.txt lists nearly every sequence beside its base.
Two groups are OpenMoji's own: `extras-openmoji` (its private-use artworks, U+E000..F8FF)
and `extras-unicode` (Unicode symbols that are not emoji, which OpenMoji also draws).
"""

from __future__ import annotations

import bisect

GROUP_RANGES: dict[str, str] = {
    "smileys-emotion": """
        2620 2639-263A 2763-2764 1F479-1F47B 1F47D-1F480 1F48B-1F48C 1F493-1F49F 1F4A2 1F4A4-1F4A6
        1F4A8-1F4A9 1F4AB-1F4AD 1F4AF 1F573 1F5A4 1F5E8 1F5EF 1F600-1F644 1F648-1F64A 1F90D-1F90E
        1F910-1F917 1F920-1F925 1F927-1F92F 1F970-1F976 1F978-1F97A 1F9D0 1F9E1 1FA75-1FA77
        1FAE0-1FAE5 1FAE8-1FAEA 1FAEF""",
    "people-body": """
        261D 26F7 26F9 270A-270D 1F385 1F3C2-1F3C4 1F3C7 1F3CA-1F3CC 1F440-1F450 1F463-1F478 1F47C
        1F481-1F483 1F485-1F487 1F48F 1F491 1F4AA 1F574-1F575 1F57A 1F590 1F595-1F596 1F5E3
        1F645-1F647 1F64B-1F64F 1F6A3 1F6B4-1F6B6 1F6C0 1F6CC 1F90C 1F90F 1F918-1F91F 1F926
        1F930-1F93A 1F93C-1F93E 1F977 1F9B4-1F9B9 1F9BB 1F9BE-1F9BF 1F9CC-1F9CF 1F9D1-1F9E0
        1FAC0-1FAC6 1FAE6 1FAF0-1FAF8""",
    "component": "1F3FB-1F3FF 1F9B0-1F9B3",
    "animals-nature": """
        2618 1F331-1F335 1F337-1F344 1F3F5 1F400-1F43F 1F490 1F4AE 1F54A 1F577-1F578 1F940
        1F981-1F98F 1F992-1F99D 1F99F-1F9A9 1F9AB-1F9AE 1FAB0-1FAB4 1FAB6-1FABF 1FAC8 1FACD-1FACF""",
    "food-drink": """
        2615 1F32D-1F330 1F336 1F345-1F37F 1F382 1F3FA 1F52A 1F942-1F944 1F950-1F96F 1F980
        1F990-1F991 1F99E 1F9AA 1F9C0-1F9CB 1FAD0-1FADC""",
    "travel-places": """
        231A-231B 23F0-23F3 2600-2604 2614 2668 2693 26A1 26C4-26C5 26C8 26E9-26EA 26F0-26F2
        26F4-26F5 26FA 26FD 2708 2744 2B50 1F300-1F321 1F324-1F32C 1F3A0-1F3A2 1F3AA 1F3CD-1F3CE
        1F3D4-1F3E6 1F3E8-1F3ED 1F3EF-1F3F0 1F488 1F492 1F4A7 1F4BA 1F525 1F54B-1F54D 1F550-1F567
        1F570 1F5FA-1F5FE 1F680-1F6A2 1F6A4-1F6A8 1F6B2 1F6CE 1F6D1 1F6D5-1F6D6 1F6D8 1F6DD-1F6DF
        1F6E2-1F6E5 1F6E9-1F6EC 1F6F0 1F6F3-1F6F6 1F6F8-1F6FC 1F9BC-1F9BD 1F9ED 1F9F1 1F9F3 1FA82
        1FA90 1FAA8 1FAB5""",
    "activities": """
        2660 2663 2665-2666 265F 26BD-26BE 26F3 26F8 2728 1F004 1F0CF 1F380-1F381 1F383-1F384
        1F386-1F38B 1F38D-1F391 1F396-1F397 1F39F 1F3A3 1F3A8 1F3AB 1F3AD-1F3B4 1F3BD-1F3C0
        1F3C5-1F3C6 1F3C8-1F3C9 1F3CF-1F3D3 1F3F8 1F52B 1F52E 1F579 1F5BC 1F6F7 1F93F 1F945
        1F947-1F94F 1F9E7-1F9E9 1F9F5-1F9F6 1F9F8 1FA80-1FA81 1FA84-1FA86 1FAA1-1FAA2 1FAA9""",
    "objects": """
        2328 260E 2692 2694 2696-2697 2699 26B0-26B1 26CF 26D1 26D3 2702 2709 270F 2712 1F392-1F393
        1F399-1F39B 1F39E 1F3A4-1F3A5 1F3A7 1F3A9 1F3AC 1F3B5-1F3BC 1F3EE 1F3F7 1F3F9 1F451-1F462
        1F484 1F489-1F48A 1F48D-1F48E 1F4A1 1F4A3 1F4B0 1F4B3-1F4B9 1F4BB-1F4DA 1F4DC-1F4F2
        1F4F7-1F4FD 1F4FF 1F507-1F517 1F526-1F529 1F52C-1F52D 1F56F 1F576 1F587 1F58A-1F58D
        1F5A5-1F5B2 1F5C2-1F5C4 1F5D1-1F5D3 1F5DC-1F5DE 1F5E1 1F5F3 1F5FF 1F6AA 1F6AC 1F6BD 1F6BF
        1F6C1 1F6CB 1F6CD 1F6CF 1F6D2 1F6D7 1F6E0-1F6E1 1F941 1F97B-1F97F 1F9AF 1F9BA 1F9E2-1F9E6
        1F9EA-1F9EC 1F9EE-1F9F0 1F9F2 1F9F4 1F9F7 1F9F9-1F9FF 1FA70-1FA74 1FA78-1FA7C 1FA83
        1FA87-1FA8F 1FA91-1FAA0 1FAA3-1FAA7 1FAAA-1FAAE 1FADF 1FAE7""",
    "symbols": """
        0023 002A 0030-0039 00A9 00AE 203C 2049 2122 2139 2194-2199 21A9-21AA 23CF 23E9-23EF
        23F8-23FA 24C2 25AA-25AB 25B6 25C0 25FB-25FE 2611 2622-2623 2626 262A 262E-262F 2638
        2640 2642 2648-2653 267B 267E-267F 2695 269B-269C 26A0 26A7 26AA-26AB 26CE 26D4 2705 2714
        2716 271D 2721 2733-2734 2747 274C 274E 2753-2755 2757 2795-2797 27A1 27B0 27BF 2934-2935
        2B05-2B07 2B1B-2B1C 2B55 3030 303D 3297 3299 1F170-1F171 1F17E-1F17F 1F18E 1F191-1F19A
        1F201-1F202 1F21A 1F22F 1F232-1F23A 1F250-1F251 1F3A6 1F3E7 1F4A0 1F4B1-1F4B2 1F4DB
        1F4F3-1F4F6 1F500-1F506 1F518-1F524 1F52F-1F53D 1F549 1F54E 1F6AB 1F6AD-1F6B1 1F6B3
        1F6B7-1F6BC 1F6BE 1F6C2-1F6C5 1F6D0 1F6DC 1F7E0-1F7EB 1F7F0 1FAAF""",
    "flags": "1F1E6-1F1FF 1F38C 1F3C1 1F3F3-1F3F4 1F6A9",
}

EXTRAS_OPENMOJI = "extras-openmoji"
EXTRAS_UNICODE = "extras-unicode"
GROUPS: tuple[str, ...] = (*GROUP_RANGES, EXTRAS_OPENMOJI, EXTRAS_UNICODE)

REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
PRIVATE_USE = range(0xE000, 0xF900)

NEWER_NAMES: dict[int, str] = {
    # Emoji encoded after Unicode 14.0, the database of Python 3.11's unicodedata.
    0x1F6D8: "landslide", 0x1F6DC: "wireless", 0x1FA75: "light blue heart", 0x1FA76: "grey heart",
    0x1FA77: "pink heart", 0x1FA87: "maracas", 0x1FA88: "flute", 0x1FA89: "harp", 0x1FA8A: "trombone",
    0x1FA8E: "treasure chest", 0x1FA8F: "shovel", 0x1FAAD: "folding hand fan", 0x1FAAE: "hair pick",
    0x1FAAF: "khanda", 0x1FABB: "hyacinth", 0x1FABC: "jellyfish", 0x1FABD: "wing", 0x1FABE: "leafless tree",
    0x1FABF: "goose", 0x1FAC6: "fingerprint", 0x1FAC8: "hairy creature", 0x1FACD: "orca", 0x1FACE: "moose",
    0x1FACF: "donkey", 0x1FADA: "ginger root", 0x1FADB: "pea pod", 0x1FADC: "root vegetable",
    0x1FADF: "splatter", 0x1FAE8: "shaking face", 0x1FAE9: "face with bags under eyes",
    0x1FAEA: "distorted face", 0x1FAEF: "fight cloud", 0x1FAF7: "leftwards pushing hand",
    0x1FAF8: "rightwards pushing hand",
}


def _parse(table: dict[str, str]) -> tuple[list[int], list[int], list[str]]:
    spans = []
    for group, text in table.items():
        for token in text.split():
            first, _, last = token.partition("-")
            spans.append((int(first, 16), int(last or first, 16), group))
    spans.sort()
    for (_, end, g1), (start, _, g2) in zip(spans, spans[1:], strict=False):
        if start <= end:  # a table typo would silently shadow a range: refuse it at import
            raise AssertionError(f"emoji group ranges overlap: {g1} and {g2} at U+{start:04X}")
    return [s[0] for s in spans], [s[1] for s in spans], [s[2] for s in spans]


_STARTS, _ENDS, _GROUPS = _parse(GROUP_RANGES)


def group_of(code_points: tuple[int, ...] | list[int]) -> str:
    """The emoji group of a code-point sequence (that of its first code point)."""
    first = code_points[0]
    if first in PRIVATE_USE or any(cp in PRIVATE_USE for cp in code_points):
        return EXTRAS_OPENMOJI
    if first in REGIONAL_INDICATORS and len(code_points) == 1:
        return EXTRAS_UNICODE  # a lone regional-indicator letter, not a flag
    i = bisect.bisect_right(_STARTS, first) - 1
    if i >= 0 and first <= _ENDS[i]:
        return _GROUPS[i]
    return EXTRAS_UNICODE
