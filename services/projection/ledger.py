"""The 台账 (R12): every outgoing trip, by person and day, with its origin, destination,
vehicle, times and 报备 status; as JSON, CSV (UTF-8 with BOM, so Excel shows the Chinese)
or XLSX. Rows are pure data; the writers only format them."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any

from services.projection.data import AuditData, received_by, unit_dispatch
from services.projection.facts import REGION_TZ, local_day
from services.projection.findings import RETURN_TO_ORIGIN, reported_late

# (key, header as the health bureau reads it)
COLUMNS = (
    ("day", "日期"), ("patient_name", "姓名"), ("id_number", "身份证号"), ("phone", "联系电话"),
    ("risk_category", "人员类别"), ("purpose", "转运目的"), ("transfer_id", "转运单号"),
    ("trip_id", "出车编号"), ("vehicle_id", "车辆"), ("plate", "车牌"), ("origin", "起点"),
    ("destination", "目的地"), ("requested_at", "申请时间"), ("dispatched_at", "派车时间"),
    ("at_pickup_at", "到达接人时间"), ("handed_over_at", "交接时间"), ("received_by", "接收人"),
    ("reported", "报备状态"), ("reported_at", "报备时间"), ("reported_by", "报备单位"),
    ("report_delivery", "报备送达"), ("status", "状态"),
)


# The files are read by the health bureau: codes as it names them (the JSON keeps the codes,
# for systems). A code not listed (a newer one) is shown as it is.
LABELS: dict[str, dict[str, str]] = {
    "risk_category": {
        "isolation_site": "集中隔离点人员", "sealed_area": "封控区人员", "controlled_area": "管控区人员",
        "precaution_area": "防范区人员", "home_monitoring": "居家健康监测人员", "confirmed": "确诊病例",
        "suspected": "疑似病例", "fever_clinic": "发热门诊患者", "fangcang": "方舱医院患者"},
    "purpose": {
        "outpatient_visit": "就医", "admission": "住院", "transfer_to_designated": "转定点医院",
        "scheduled_care": "定期治疗", "emergency": "急救", "return_leg": "返程"},
    "status": {
        "waiting": "待派车", "assigned": "已派车", "on_trip": "转运中", "handed_over": "已交接",
        "completed": "已完成", "aborted": "中途取消出车", "taken_over": "换车接续", "cancelled": "已取消"},
}


def _shown(key: str, value: Any) -> Any:
    labels = LABELS.get(key)
    return labels.get(value, value) if labels is not None and isinstance(value, str) else value


def _device(ref: dict[str, Any] | None) -> str | None:
    return _local(ref.get("at")) if ref else None


def _local(at: str | None) -> str | None:
    """A time in the region's civil time, to the second, as its day column counts days
    (the bureau reads 00:27 on the 24th, not 16:27 UTC on the 23rd)."""
    if not at:
        return None
    try:
        return datetime.fromisoformat(at).astimezone(REGION_TZ).isoformat(timespec="seconds")
    except (ValueError, OverflowError):  # not a time (or none the calendar reaches in +08:00)
        return at  # shown as it was recorded


READS = ("transfers", "trips", "vehicles", "facilities")  # the fact tables rows() reads


def _taken_off_aboard(trip: dict[str, Any]) -> bool:
    """Completed with no handover: dispatch took the vehicle off (a breakdown) with the
    patient aboard, and another vehicle takes them over (the transfer service completes
    such a trip, since its vehicle carried the patient and needs disinfection)."""
    return bool(trip.get("completed")) and not (trip.get("handover") or trip.get("s_handed_over"))


def _ended_short(trip: dict[str, Any]) -> bool:
    """Over without delivering its patient: aborted, or taken off with the patient aboard."""
    return bool(trip.get("aborted")) or _taken_off_aboard(trip)

def _destination(data: AuditData, t: dict[str, Any], destination: str | None) -> str | None:
    """The destination's name; a return leg's is the outbound transfer's origin."""
    if destination == RETURN_TO_ORIGIN and t.get("return_of"):
        outbound = (data.transfers.get(t["return_of"]) or {}).get("request") or {}
        name = (outbound.get("origin") or {}).get("name")
    else:
        name = (data.facilities.get(destination or "") or {}).get("name")
    return str(name) if name else destination


def rows(data: AuditData, day_from: str | None = None, day_to: str | None = None) -> list[dict[str, Any]]:
    """One row per trip (a transfer with two vehicles after a breakdown has two), and one
    per transfer waiting for a vehicle (none yet, or every trip ended without delivering
    the patient: aborted, or taken off with the patient aboard), so the ledger misses
    nobody. Status: waiting, assigned, on_trip, handed_over, completed, aborted (ended
    before pickup), taken_over (the vehicle was taken off with the patient aboard, who goes
    on in another), cancelled."""
    indexed = data.indexed()
    out: list[dict[str, Any]] = []
    for tid, t in indexed.transfers.items():
        request = t.get("request")
        if not request:
            continue
        requested_day = t.get("day") or local_day(request["at"])
        patient = request.get("patient") or {}
        reported = t.get("reported")
        delivery = t.get("delivery")
        cancelled = bool(t.get("cancelled"))
        base = {
            "patient_name": patient.get("name"), "id_number": patient.get("id_number"),
            "phone": patient.get("phone"), "risk_category": request.get("risk_category"),
            "purpose": request.get("purpose"), "transfer_id": tid,
            "origin": (request.get("origin") or {}).get("name"),
            "destination": _destination(indexed, t, t.get("destination_id")),
            "requested_at": _local(request.get("at")), "dispatched_at": _device(t.get("assigned")),
            # Reported is what dispatch decided; whether the bureau's system got it is
            # what the webhook said last (nothing when no webhook is configured).
            "reported": ("未报备" if not reported else
                         "报备失败" if delivery and not delivery.get("delivered") else
                         "逾期报备" if reported_late(t) else "已报备"),
            "reported_at": _device(reported), "reported_by": (reported or {}).get("reported_by"),
            "report_delivery": (None if not delivery else
                                "已送达" if delivery.get("delivered") else "送达失败"),
        }
        rows_of_transfer = []
        trips = indexed.trips_of_transfer(tid)
        carrying = indexed.carrying_trip(tid) if trips else None
        if not trips:
            rows_of_transfer.append({
                **base, "day": requested_day, "trip_id": None, "vehicle_id": t.get("vehicle_id"),
                "plate": None, "at_pickup_at": None, "handed_over_at": None, "received_by": None,
                "status": "cancelled" if cancelled else "assigned" if t.get("assigned") else "waiting"})
        elif not cancelled and not t.get("handed_over") and all(_ended_short(trip) for trip in trips):
            rows_of_transfer.append({
                **base, "day": requested_day, "trip_id": None, "vehicle_id": None, "plate": None,
                "dispatched_at": None, "at_pickup_at": None, "handed_over_at": None, "received_by": None,
                "status": "waiting"})
        for trip in trips:
            vehicle = indexed.vehicles.get(trip.get("vehicle_id") or "") or {}
            handover = trip.get("handover") or {}
            taken_off = _taken_off_aboard(trip)  # (or the transfer cancelled with the patient aboard)
            status = ("cancelled" if taken_off and cancelled else
                      "taken_over" if taken_off else
                      "completed" if trip.get("completed") else
                      "handed_over" if handover else
                      "aborted" if trip.get("aborted") else
                      "cancelled" if cancelled else "on_trip")
            # Each trip its own vehicle's dispatch and where it went: the one that carried the
            # patient where the transfer ended, an earlier one (a breakdown) where it was sent.
            went = handover.get("facility_id") or (
                t.get("destination_id") if trip is carrying else trip.get("destination_id")) or t.get(
                "destination_id")
            rows_of_transfer.append({
                # The trip's day: a care-series transfer may be requested the day before.
                **base, "day": local_day(trip["opened_at"]) if trip.get("opened_at") else requested_day,
                "destination": _destination(indexed, t, went),
                "dispatched_at": _device(unit_dispatch(t, trip)),
                "trip_id": trip["trip_id"], "vehicle_id": trip.get("vehicle_id"),
                "plate": vehicle.get("plate"), "at_pickup_at": _device(trip.get("s_at_pickup")),
                "handed_over_at": _device(trip.get("handover") or trip.get("s_handed_over")),
                "received_by": received_by(trip), "status": status,
            })
        out += [r for r in rows_of_transfer
                if not (day_from and r["day"] < day_from) and not (day_to and r["day"] >= day_to)]
    out.sort(key=lambda r: (r["day"], r["patient_name"] or "", r["requested_at"] or "", r["trip_id"] or ""))
    return out


def to_csv(rows_: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([h for _, h in COLUMNS])
    for r in rows_:
        writer.writerow([_cell(_shown(k, r.get(k))) for k, _ in COLUMNS])
    return ("\ufeff" + buf.getvalue()).encode()


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> str:
    """A CSV cell Excel shows as text: a name typed as `=HYPERLINK(...)` would otherwise
    run as a formula on the bureau's machine (OWASP's CSV injection; a leading quote); a
    number in clear, read as a number, would lose digits (an 18-digit id kept as
    6.40121E+17, a landline its leading 0), so it leads with a tab, which Excel does not show."""
    if value is None:
        return ""
    text = str(value)
    if text.startswith(_FORMULA):
        return "'" + text
    return "\t" + text if text.isascii() and text.isdigit() and (len(text) > 11 or text[0] == "0") else text


# The columns that are times (local, +08:00) and the day: XLSX cells the bureau can sort
# and filter as dates, not text.
TIMES = ("requested_at", "dispatched_at", "at_pickup_at", "handed_over_at", "reported_at")


def _spreadsheet_time(value: str, day: bool) -> datetime | None:
    """A ledger time as the spreadsheet's cell: the region's civil time without its offset
    (a spreadsheet's dates have no zone; the day column counts the same days). None: not a
    time (shown as it was recorded)."""
    try:
        when = datetime.fromisoformat(value)
        if when.tzinfo is not None:
            when = when.astimezone(REGION_TZ).replace(tzinfo=None)
    except (ValueError, OverflowError):
        return None
    if when.year < 1900:  # before the spreadsheet's calendar: no date it can show
        return None
    return when if not day or len(value) == 10 else None


def to_xlsx(rows_: list[dict[str, Any]], title: str = "转运台账") -> bytes:
    import xlsxwriter  # type: ignore[import-untyped]

    out = io.BytesIO()
    # constant_memory streams rows to the file: a year's ledger does not sit in memory.
    book = xlsxwriter.Workbook(out, {"constant_memory": True})
    sheet = book.add_worksheet(title)
    bold = book.add_format({"bold": True})
    formats = {"day": book.add_format({"num_format": "yyyy-mm-dd"}),
               **dict.fromkeys(TIMES, book.add_format({"num_format": "yyyy-mm-dd hh:mm:ss"}))}
    for col, (key, header) in enumerate(COLUMNS):
        sheet.write_string(0, col, header, bold)
        if key in formats:
            sheet.set_column(col, col, 11 if key == "day" else 20)
    for i, r in enumerate(rows_, start=1):
        for col, (key, _) in enumerate(COLUMNS):
            value = _shown(key, r.get(key))
            if value is None:
                continue
            when = _spreadsheet_time(str(value), key == "day") if key in formats else None
            if when is not None:
                sheet.write_datetime(i, col, when, formats[key])
            else:
                sheet.write_string(i, col, str(value))
    sheet.freeze_panes(1, 0)
    book.close()
    return out.getvalue()
