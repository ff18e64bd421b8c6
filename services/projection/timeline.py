"""One transfer's story, from the request to the loop closed: each event with the actor's
time and the server's, who, in which role, where, and why (the reasons dispatch recorded
for its decisions); the notifications sent and acknowledged. Pure: no I/O. Events of
types this service does not know yet are shown as they are, never dropped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from libs.events.envelope import Envelope
from services.projection.data import seconds, ts
from services.projection.findings import needs_return

LABELS_ZH = {
    "TransferRequested": "转运申请",
    "TransferPrioritized": "分级排序",
    "DestinationAssigned": "指定目的地",
    "TransferQueued": "排队等车",
    "VehicleAssigned": "派车",
    "VehicleReserved": "车辆占用",
    "TransferReported": "向县卫健局报备",
    "TripOpened": "出车任务建立",
    "TripStepReported": "车组上报",
    "PatientHandedOver": "患者交接",
    "HandoverConfirmed": "交接确认",
    "TripCompleted": "转运结束",
    "TransferHandedOver": "转运单交接完成",
    "VehicleAwaitingDisinfection": "车辆待洗消",
    "CycleOpened": "洗消周期开启",
    "InitialDisinfectionLogged": "首次消毒",
    "TerminalDisinfectionLogged": "终末消毒",
    "SampleRegistered": "样本登记",
    "SurfaceSwabCollected": "物表采样",
    "SwabResultRecorded": "核酸结果",
    "VehicleReleased": "洗消放行",
    "VehicleQuarantined": "车辆隔离停用",
    "VehicleReturnedToService": "车辆恢复可派",
    "TransferReprioritized": "调整优先级",
    "TransferRedirected": "改派目的地",
    "TripRedirected": "行程改派目的地",
    "DestinationUnresolved": "暂无可收治目的地",
    "DestinationKnown": "目的地已确定",
    "RuleOverridden": "越权操作（记录规则）",
    "VehicleWithdrawn": "车辆撤回",
    "TripAborted": "出车中止",
    "TransferCancelled": "转运取消",
    "TransferPickedUp": "患者已接到",
    "TripPositionRecorded": "车辆位置",
    "ReturnRequested": "申请返程",
    "PatientAdmitted": "收治入院",
    "LoopClosed": "闭环完成",
    "VehicleReleaseReceivedEarly": "提前放行",
    "VehicleStoodDown": "车辆解除占用",
    "VehicleHoldLifted": "车辆解除等待（患者未上车）",
    "VehicleTakenOutOfService": "车辆停用",
    "CycleSuperseded": "洗消周期被替代",
    "VehicleCycleLogged": "洗消记录",
    "SwabResultOverdue": "核酸结果超时",
    "ExposureListProduced": "密接车次清单",
    "ExposureListAmended": "密接车次清单修订",
    "ExposureListAcknowledged": "密接车次清单已确认",
    "CareOccurrenceRequested": "周期性就医申请",
    "CareSeriesScheduled": "周期性就医排期",
    "CareSeriesCancelled": "周期性就医取消",
    "BackupsActivated": "启用备用医院",
    "BackupsStoodDown": "备用医院停用",
}
STEP_ZH = {"acknowledged": "接单", "en_route": "出发", "at_pickup": "到达接人点",
           "patient_aboard": "患者上车", "at_destination": "到达目的地", "handed_over": "完成交接"}
# Notifications: type -> (what, to whom, what happened to it), as dispatch (报备) and the
# transfer service (the hospital's pre-arrival notice) record them.
NOTIFICATIONS = {
    "TransferReported": ("报备 (R10)", "county_health_bureau", "sent"),
    "ReportDelivered": ("报备 (R10)", "county_health_bureau", "acknowledged"),
    "ReportDeliveryFailed": ("报备 (R10)", "county_health_bureau", "failed"),
    "PreArrivalNoticeIssued": ("pre-arrival notice", "receiving hospital", "issued"),
    "PreArrivalNoticeDelivered": ("pre-arrival notice", "receiving hospital", "delivered"),
    "PreArrivalNoticeDeliveryFailed": ("pre-arrival notice", "receiving hospital", "failed"),
    "PreArrivalNoticeResent": ("pre-arrival notice", "receiving hospital", "resent"),
    "PreArrivalNoticeAcknowledged": ("pre-arrival notice", "receiving hospital", "acknowledged"),
    "PreArrivalNoticeEscalated": ("pre-arrival notice", "dispatcher", "escalated"),
    # R9: the patient rode in a vehicle later found positive (the disinfection service's
    # list names them; a dispatcher acknowledges it).
    "ExposureListProduced": ("exposure list (R9)", "dispatcher", "issued"),
    "ExposureListAmended": ("exposure list (R9)", "dispatcher", "amended"),
    "ExposureListAcknowledged": ("exposure list (R9)", "dispatcher", "acknowledged"),
}
REASON_KEYS = ("reason", "override_reason", "candidates", "policy", "priority")
CLOSING = {"PatientAdmitted", "LoopClosed"}


# A crew step sent without a position happened where its trip says: at the patient's
# origin, or at the destination.
AT_ORIGIN, AT_DESTINATION = {"at_pickup", "patient_aboard"}, {"at_destination", "handed_over"}


def place(env: Envelope, trips: dict[str, tuple[Any, Any]] | None = None) -> Any:
    """Where it happened: as the event says (a position, a stage's location, a facility);
    else, for a crew step, from its trip (`trips`: trip id -> (origin, destination)); an
    assignment sends the vehicle to the patient's origin."""
    p = env.payload
    if env.type == "TransferRequested":
        return (p.get("origin") or {}).get("name")
    if p.get("position"):
        return p["position"]
    stage = p.get("stage")
    if isinstance(stage, dict) and stage.get("location"):
        return stage["location"]
    if env.type == "VehicleAssigned":
        return (p.get("origin") or {}).get("name") or p.get("destination_id")
    origin, destination = (trips or {}).get(str(p.get("trip_id")), (None, None))
    if env.type == "TripStepReported" and p.get("step") in AT_ORIGIN:
        return origin
    if env.type == "TripStepReported" and p.get("step") in AT_DESTINATION:
        return destination
    return p.get("facility_id") or p.get("to_facility_id") or p.get("destination_id")


def entry(env: Envelope, return_legs: frozenset[str] = frozenset(),
          trips: dict[str, tuple[Any, Any]] | None = None) -> dict[str, Any]:
    p = env.payload
    label = LABELS_ZH.get(env.type, env.type)
    if env.type == "TripStepReported":
        label = f"{label}：{STEP_ZH.get(p.get('step', ''), p.get('step'))}"
    skew = seconds(env.occurred_at, env.recorded_at)
    return {
        "type": env.type, "label_zh": label, "occurred_at": env.occurred_at,
        "recorded_at": env.recorded_at,
        # How far the actor's clock (a crew phone) is from the server's: shown, not trusted.
        "receipt_delay_seconds": skew if skew else 0.0,
        "actor": env.actor, "role": env.role, "place": place(env, trips),
        "why": {k: p[k] for k in REASON_KEYS if p.get(k) not in (None, [], "")} or None,
        "store": env.store, "stream_id": env.stream_id, "stream_version": env.stream_version,
        "position": env.position, "event_id": str(env.event_id), "payload": p,
        "known": env.type in LABELS_ZH or env.type in NOTIFICATIONS,
        "leg": "return" if _transfer_of(env) in return_legs else "outbound",
    }


def _transfer_of(env: Envelope) -> str:
    """The transfer an event belongs to: named in it, else the one its flow correlates by."""
    return str(env.payload.get("transfer_id") or env.correlation_id)


def _before_handover(ordered: list[Envelope]) -> str:
    """Where a transfer stands before its handover: dispatch's latest decision on it (queued,
    a vehicle given, the vehicle withdrawn: a crew abort or a breakdown puts it back; a
    cancel is final), on a trip while the vehicle it was given has one open. Across stores
    by dispatch's word, not by which event a store recorded last: the trip a withdrawn
    vehicle aborts may be recorded after the next vehicle was given."""
    status, vehicle = "requested", None
    open_trips: dict[str, Any] = {}  # trip id -> its vehicle
    for e in ordered:
        p = e.payload
        if e.type == "TransferCancelled":
            return "cancelled"
        if e.type == "TransferQueued":
            status, vehicle = "queued", None
        elif e.type == "VehicleAssigned":
            status, vehicle = "assigned", p.get("vehicle_id")
        elif e.type == "VehicleWithdrawn":
            status, vehicle = "requested", None
        elif e.type == "TripOpened":
            open_trips[str(p.get("trip_id"))] = p.get("vehicle_id")
        elif e.type in ("TripAborted", "TripCompleted"):
            open_trips.pop(str(p.get("trip_id")), None)
    return "on_trip" if status == "assigned" and vehicle in open_trips.values() else status


def _trip_places(ordered: list[Envelope], origins: dict[str, Any]) -> Iterator[dict[str, tuple[Any, Any]]]:
    """For each event in turn, each trip's (origin, destination) as it stood then: a
    redirect moves the destination of the steps after it; a takeover vehicle meets the
    patient where the broken-down one stopped, not at the origin."""
    trips: dict[str, tuple[Any, Any]] = {}
    for e in ordered:
        p = e.payload
        trip_id = str(p.get("trip_id"))
        if e.type == "TripOpened":
            takeover = p.get("takeover_of")
            origin = (f"接替故障车辆{takeover}处 (where {takeover} broke down)" if takeover
                      else (p.get("origin") or {}).get("name") or origins.get(_transfer_of(e)))
            trips = {**trips, trip_id: (origin, p.get("destination_id"))}
        elif e.type == "TripRedirected" and trip_id in trips:
            trips = {**trips, trip_id: (trips[trip_id][0], p.get("destination_id"))}
        yield trips


def timeline_view(transfer_id: str, events: list[Envelope],
                  return_legs: frozenset[str] = frozenset()) -> dict[str, Any]:
    """`return_legs`: the transfers that bring this one's patient back (their `return_of`
    names it); their events are in the story too, up to the loop closed."""
    ordered = sorted(events, key=lambda e: (ts(e.recorded_at), e.store, e.position))
    origins = {_transfer_of(e): (e.payload.get("origin") or {}).get("name")
               for e in ordered if e.type == "TransferRequested"}
    entries = [entry(e, return_legs, trips) for e, trips in zip(ordered, _trip_places(ordered, origins),
                                                                  strict=True)]
    types = {e.type for e in ordered if _transfer_of(e) not in return_legs}
    back = {e.type for e in ordered if _transfer_of(e) in return_legs}
    notifications = [
        {"what": NOTIFICATIONS[e.type][0], "to": NOTIFICATIONS[e.type][1],
         "state": NOTIFICATIONS[e.type][2], "at": e.recorded_at, "by": e.actor,
         "payload": e.payload, "event_id": str(e.event_id)}
        for e in ordered if e.type in NOTIFICATIONS
    ]
    requested = next((e for e in ordered if e.type == "TransferRequested"), None)
    return_required = bool(requested and needs_return(requested.payload))
    handed = "TransferHandedOver" in types or "PatientHandedOver" in types
    returned = "TransferHandedOver" in back or "PatientHandedOver" in back
    if types & CLOSING or (handed and (returned or not return_required)):
        status = "loop_closed"
    elif back:
        status = "return_leg"
    elif handed:
        status = "awaiting_return_leg"  # R11: closed by the return leg or an admission (issue 4)
    else:
        status = _before_handover([e for e in ordered if _transfer_of(e) not in return_legs])
    return {"transfer_id": transfer_id, "status": status, "return_required": return_required,
            "return_legs": sorted(return_legs), "entries": entries, "notifications": notifications}
