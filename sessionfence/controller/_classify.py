"""What an appended run of JSONL lines is: the benign policy and owned-entry matching.

Line classification, published-entry matching, owned initialization and the append advance
(docs/design.md, "Benign policy" and "Publications"). A rewrite of old lines is always a
takeover; the openclaw controller's acceptance of the v1 linear-migration rewrite is
deliberately not ported (docs/design.md, "Provenance"). The JSON rules (``JSON.parse``,
``trim()``, deep equality) are ``_jsonl``'s, shared with the transcript model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._callbacks import PublishedEntry
from .._jsonl import js_trim, json_equal, parse_json

__all__ = [
    "BenignPolicy",
    "Classified",
    "Line",
    "Rejected",
    "classify_lines",
    "migrates",
    "same_published_entries",
    "split_lines",
]

_UNDEFINED = object()
TRANSCRIPT_ONLY = "transcript-only"
GLOBAL_METADATA = "global-metadata"
OPAQUE = "opaque"


def _nonblank(value: Any) -> bool:
    return isinstance(value, str) and js_trim(value) != ""


def _null_or_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def has_entry_base(entry: Any) -> bool:
    """id (non-blank), parentId present and null-or-string, timestamp (non-blank)."""
    return (
        isinstance(entry, dict)
        and _nonblank(entry.get("id"))
        and "parentId" in entry
        and _null_or_str(entry["parentId"])
        and _nonblank(entry.get("timestamp"))
    )


def is_message_entry(entry: Any) -> bool:
    """A structurally valid ``message`` line (any role)."""
    if not isinstance(entry, dict) or entry.get("type") != "message":
        return False
    if not (_nonblank(entry.get("id")) and _nonblank(entry.get("timestamp"))):
        return False
    if not _null_or_str(entry.get("parentId")):
        return False
    if entry.get("appendMode", "side") != "side":
        return False
    message = entry.get("message")
    return isinstance(message, dict) and isinstance(message.get("role"), str)


def is_global_metadata(entry: Any) -> bool:
    """custom / label / session_info records with a valid entry base."""
    if not has_entry_base(entry):
        return False
    kind = entry.get("type")
    if kind == "custom":
        return _nonblank(entry.get("customType"))
    if kind == "label":
        return _nonblank(entry.get("targetId")) and (
            "label" not in entry or isinstance(entry["label"], str)
        )
    if kind == "session_info":
        return "name" not in entry or isinstance(entry["name"], str)
    return False


def is_side_leaf_control(entry: Any) -> bool:
    """A ``leaf`` control that moves only the side cursor, never the visible leaf."""
    return (
        has_entry_base(entry)
        and entry.get("type") == "leaf"
        and "targetId" in entry
        and _null_or_str(entry["targetId"])
        and _null_or_str(entry.get("appendParentId"))
        and entry.get("appendMode") == "side"
    )


class BenignPolicy:
    """Which unowned appended entries a fence may accept (docs/design.md, "Benign policy").

    The default accepts openclaw's benign entries: transcript-only assistant messages
    (delivery mirrors and gateway injections), ``custom`` / ``label`` / ``session_info``
    records and side-mode ``leaf`` controls; without a merge callback only the
    transcript-only messages. Subclass and override :meth:`classify_entry` (or pass other
    ``transcript_only_models``) to name another framework's mirror entries.
    """

    DEFAULT_TRANSCRIPT_ONLY_MODELS = frozenset({"delivery-mirror", "gateway-injected"})

    def __init__(
        self,
        *,
        provider: str = "openclaw",
        transcript_only_models: Iterable[str] | None = None,
        max_unowned_append_bytes: int = 1 << 20,
    ) -> None:
        self.provider = provider
        self.transcript_only_models = frozenset(
            self.DEFAULT_TRANSCRIPT_ONLY_MODELS
            if transcript_only_models is None
            else transcript_only_models
        )
        self.max_unowned_append_bytes = max_unowned_append_bytes

    def is_transcript_only_message(self, entry: Any) -> bool:
        if not is_message_entry(entry):
            return False
        message = entry["message"]
        return (
            message.get("role") == "assistant"
            and message.get("provider") == self.provider
            and message.get("model") in self.transcript_only_models
        )

    def classify_entry(self, entry: Any) -> str | None:
        """``"transcript-only"``, ``"global-metadata"``, ``"opaque"`` or None (not benign)."""
        if self.is_transcript_only_message(entry):
            return TRANSCRIPT_ONLY
        if is_global_metadata(entry):
            return GLOBAL_METADATA
        if is_side_leaf_control(entry):
            return OPAQUE
        return None

    def accepts(self, kind: str, *, has_merge_callback: bool) -> bool:
        """Whether a change of overall ``kind`` is benign. Only a merge callback can resync
        metadata and leaf controls into the session, so without one only transcript-only
        lines pass."""
        return has_merge_callback or kind == TRANSCRIPT_ONLY


@dataclass(frozen=True)
class Line:
    text: str  # trimmed
    offset: int  # byte offset of the line in the file
    parsed: bool
    value: Any = None


@dataclass(frozen=True)
class Classified:
    kind: str
    entries: list[Any] = field(default_factory=list)
    published: list[PublishedEntry] = field(default_factory=list)


@dataclass(frozen=True)
class Rejected:
    detail: str
    offset: int | None = None


def split_lines(data: bytes, base_offset: int) -> list[Line] | Rejected:
    """Non-empty trimmed lines of an appended run; the run must end with a newline."""
    if not data.endswith(b"\n"):
        return Rejected("appended bytes do not end with a newline (torn line)", base_offset)
    lines: list[Line] = []
    pos = 0
    for raw in data.split(b"\n")[:-1]:
        text = js_trim(raw.decode("utf-8", errors="replace"))
        if text:
            ok, value = parse_json(text)
            lines.append(Line(text, base_offset + pos, ok, value))
        pos += len(raw) + 1
    return lines


def _describe(line: Line) -> str:
    if not line.parsed:
        return "unparseable JSON"
    value = line.value
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "message" and isinstance(value.get("message"), dict):
            role = value["message"].get("role")
            return f"message (role {role!r})"
        return f"{kind!r} entry" if kind is not None else "entry without a type"
    return f"JSON {type(value).__name__}"


def _without(obj: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in keys}


def migrates(prev: str, cur: str, expected_parent: Any) -> tuple[bool, Any]:
    """Whether line ``prev`` becomes ``cur`` by the v1->v2 id/parentId migration only;
    returns (ok, next expected parent)."""
    ok_prev, p = parse_json(prev)
    ok_cur, c = parse_json(cur)
    if not (ok_prev and ok_cur) or not isinstance(p, dict):
        return js_trim(prev) == js_trim(cur), expected_parent
    if not isinstance(c, dict):
        return False, expected_parent
    if p.get("type") == "session":
        return json_equal(_without(p, "version"), _without(c, "version")), expected_parent
    cur_id = c.get("id", _UNDEFINED)
    if _nonblank(p.get("id")):
        if not (isinstance(cur_id, str) and cur_id == p["id"]):
            return False, expected_parent
    elif not _nonblank(cur_id):
        return False, expected_parent
    cur_parent = c.get("parentId", _UNDEFINED)
    want_parent = p.get("parentId", expected_parent)
    if cur_parent is _UNDEFINED or not json_equal(cur_parent, want_parent):
        return False, expected_parent
    rest_p = _without(p, "id", "parentId")
    rest_c = _without(c, "id", "parentId")
    if not json_equal(rest_p, rest_c):
        return False, expected_parent
    return True, cur_id


def _owned_kind(line: Line) -> str | None:
    if not line.parsed:
        return None
    value = line.value
    if is_message_entry(value):
        return TRANSCRIPT_ONLY
    if is_global_metadata(value):
        return GLOBAL_METADATA
    # Owned writes may append anything but a malformed message.
    if isinstance(value, dict) and value.get("type") == "message":
        return None
    return OPAQUE


def _match_descriptor(
    remaining: list[PublishedEntry], line: Line, expected_parent: Any
) -> tuple[int, Any] | None:
    line_id = line.value.get("id") if isinstance(line.value, dict) else None
    for i, entry in enumerate(remaining):
        if entry.get("kind") == "serialized" and js_trim(str(entry.get("serialized"))) == line.text:
            return i, line_id if _nonblank(line_id) else expected_parent
    if _nonblank(line_id):
        for i, entry in enumerate(remaining):
            if entry.get("kind") == "id" and entry.get("id") == line_id:
                return i, line_id
    for i, entry in enumerate(remaining):
        if entry.get("kind") == "serialized":
            ok, nxt = migrates(str(entry.get("serialized")), line.text, expected_parent)
            if ok:
                return i, nxt
    return None


def classify_lines(
    lines: Sequence[Line],
    *,
    policy: BenignPolicy | None,
    expected: Sequence[PublishedEntry] | None = None,
    initial_parent: Any = None,
    known_id: Callable[[str], bool] | None = None,
) -> Classified | Rejected:
    """Classify appended lines. ``policy`` None means owned mode (any valid line), else
    unowned mode through the policy. With ``expected``, every line must match one declared
    descriptor and every descriptor one line.

    In unowned mode a line whose ``id`` repeats an id of the batch, or one ``known_id``
    says the transcript already has, is refused whatever its type: ids are unique in a
    transcript, and a reader keeps one entry per id, so the line would shadow another."""
    seen_ids: set[str] = set()
    if not lines:
        return Rejected("nothing was appended")
    remaining = None if expected is None else [dict(e) for e in expected]
    expected_parent = initial_parent
    kinds: set[str] = set()
    entries: list[Any] = []
    published: list[PublishedEntry] = []
    for line in lines:
        kind = (
            _owned_kind(line)
            if policy is None
            else (policy.classify_entry(line.value) if line.parsed else None)
        )
        if kind is None:
            return Rejected(f"{_describe(line)} is not a benign entry", line.offset)
        if policy is not None and isinstance(line.value, dict):
            line_id = line.value.get("id")
            if isinstance(line_id, str):
                if line_id in seen_ids or (known_id is not None and known_id(line_id)):
                    return Rejected(
                        f"{_describe(line)} reuses the entry id {line_id!r}", line.offset
                    )
                seen_ids.add(line_id)
        if remaining is None:
            line_id = line.value.get("id") if isinstance(line.value, dict) else None
            if _nonblank(line_id):
                published.append({"kind": "id", "id": line_id})
                expected_parent = line_id
            else:
                published.append({"kind": "serialized", "serialized": line.text})
        else:
            match = _match_descriptor(remaining, line, expected_parent)
            if match is None:
                return Rejected(f"{_describe(line)} was not declared by the writer", line.offset)
            index, expected_parent = match
            published.append(remaining.pop(index))
        kinds.add(kind)
        entries.append(line.value)
    if remaining:
        return Rejected(f"{len(remaining)} declared entries were not written")
    kind = TRANSCRIPT_ONLY
    if OPAQUE in kinds:
        kind = OPAQUE
    elif GLOBAL_METADATA in kinds:
        kind = GLOBAL_METADATA
    return Classified(kind, entries, published)


def classify_initialization(
    lines: Sequence[Line], expected: Sequence[PublishedEntry]
) -> Classified | Rejected:
    """Owned creation of a transcript: an optional declared header line, then entries."""
    remaining = [dict(e) for e in expected]
    header = next((e for e in remaining if e.get("kind") == "header"), None)
    rest = list(lines)
    if header is not None:
        if not rest or rest[0].text != js_trim(str(header.get("serialized"))):
            offset = rest[0].offset if rest else None
            return Rejected("the new file does not start with the declared header", offset)
        rest = rest[1:]
        remaining.remove(header)
    if not rest:
        result = Classified(TRANSCRIPT_ONLY)
    else:
        classified = classify_lines(rest, policy=None, expected=remaining)
        if isinstance(classified, Rejected):
            return classified
        result = classified
    if header is None:
        return result
    return Classified(result.kind, result.entries, [header, *result.published])


def same_published_entries(
    actual: Sequence[PublishedEntry], expected: Sequence[PublishedEntry]
) -> bool:
    """Equal as multisets under deep JSON equality."""
    if len(actual) != len(expected):
        return False
    pool = list(expected)
    for item in actual:
        for i, candidate in enumerate(pool):
            if json_equal(item, candidate):
                del pool[i]
                break
        else:
            return False
    return True
