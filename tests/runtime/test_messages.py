"""Message families evolve safely: an older decoder reads a newer message.

Rules (gpu_fleet.messages): new fields get defaults and are appended, a field's type never
changes, and wire decoders never forbid unknown fields.  Each family is checked by decoding a
message that carries a field this version does not know.
"""

from __future__ import annotations

import json

import msgspec
import pytest

from gpu_fleet.core.placement import PackPlan, PackRequest
from gpu_fleet.messages import api, placement


def with_extra(obj: object) -> bytes:
    raw = msgspec.to_builtins(obj)
    assert isinstance(raw, dict)
    raw["addedInAFutureVersion"] = {"anything": [1, 2, 3]}
    return json.dumps(raw).encode()


def test_api_reply_round_trips_and_ignores_new_fields() -> None:
    """A CLI built today reads a reply from a newer manager."""
    reply = api.Reply(
        ok=False,
        error=api.ErrorOut(
            code="validation",
            message="1 error",
            errors=[api.FieldErrorOut("spec.x", "unknown field")],
        ),
    )
    assert api.REPLY_DECODER.decode(api.ENCODER.encode(reply)) == reply
    assert api.REPLY_DECODER.decode(with_extra(reply)) == reply


@pytest.mark.parametrize(
    "request_obj",
    [
        api.ApplyRequest(documents="kind: Run"),
        api.RunRef(namespace="rai", name="train"),
        api.ShrinkRequest(name="train", by=4),
        api.SponsorsRequest(name="train", op="add", sponsor="org:x"),
        api.NodeRequest(op="fence", name="n1"),
        api.ClockRequest(advance_to=1_800_000_000),
    ],
    ids=lambda r: type(r).__name__,
)
def test_api_requests_ignore_new_fields(request_obj: object) -> None:
    """A manager built today reads a request from a newer CLI."""
    decoded = msgspec.json.decode(with_extra(request_obj), type=type(request_obj))
    assert decoded == request_obj


def test_place_request_and_reply_ignore_new_fields() -> None:
    """Binder and manager of different versions still agree on placements."""
    req = placement.PlaceRequest(
        seq=7, run="rai/train", request=PackRequest(flavor="H100", total_gpus=8, group_gpus=8)
    )
    assert placement.REQUEST_DECODER.decode(placement.ENCODER.encode(req)) == req
    assert placement.REQUEST_DECODER.decode(with_extra(req)) == req
    reply = placement.PlaceReply(seq=7, plan=PackPlan(groups=(), total_gpus=0, total_spares=0))
    assert placement.REPLY_DECODER.decode(with_extra(reply)) == reply


def test_old_decoder_rejects_a_changed_field_type_loudly() -> None:
    """Changing a field's type is not an evolution: it fails with the field's path."""
    raw = json.dumps({"seq": "seven", "run": "x", "request": {"flavor": "H", "total_gpus": 1}})
    with pytest.raises(msgspec.ValidationError, match=r"\$\.seq"):
        placement.REQUEST_DECODER.decode(raw.encode())


def test_list_requests_carry_paging_and_a_page_reads_like_a_kubernetes_list() -> None:
    """``continue`` is the wire name (a Python keyword, so the field is ``continue_``); a page
    omits ``continue`` and ``remainingItemCount`` when nothing follows, as Kubernetes does."""
    req = msgspec.json.decode(b'{"limit": 2, "continue": "abc"}', type=api.ListRequest)
    assert (req.limit, req.continue_) == (2, "abc")
    assert msgspec.json.decode(b"{}", type=api.LeasesRequest).continue_ is None
    last = api.ListPage(items=[1])
    assert json.loads(api.ENCODER.encode(last)) == {"items": [1], "metadata": {}}
    more = api.ListPage(items=[1], metadata=api.ListMeta(continue_="t", remaining_item_count=3))
    assert json.loads(api.ENCODER.encode(more))["metadata"] == {
        "continue": "t",
        "remainingItemCount": 3,
    }
    assert msgspec.json.decode(with_extra(more), type=api.ListPage) == more
