"""Text helpers shared by the Step-3.5 reasoning and tool-call scanners."""

from typing import Iterable, Optional, Tuple


def partial_tag_len(text: str, tags: Iterable[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``tags``.

    Streaming holds this suffix back: the next chunk may complete the tag.
    """
    best = 0
    for tag in tags:
        for n in range(min(len(text), len(tag) - 1), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


def find_first(text: str, tags: Iterable[str], start: int = 0) -> Tuple[int, Optional[str]]:
    """Earliest occurrence of any of ``tags`` in ``text`` at or after ``start``.

    Ties go to the longer tag so that ``<parameter`` is not mistaken for a shorter
    tag sharing its prefix.
    """
    best_pos, best_tag = -1, None
    for tag in tags:
        pos = text.find(tag, start)
        if pos == -1:
            continue
        if best_pos == -1 or pos < best_pos or (pos == best_pos and len(tag) > len(best_tag)):
            best_pos, best_tag = pos, tag
    return best_pos, best_tag
