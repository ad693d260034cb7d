"""Messages of one subject removed from a stream that carries other subjects too.

``max_msgs_per_subject`` and a purge by subject remove a subject's oldest messages and leave
the stream's first sequence alone. They are a gap all the same: the run reports them as
``nats/gap`` (so does ``lag``), the ``no_gap`` check fails, nothing else is lost, and the
pipelines of the other subjects report no gap.
"""

import dagster as dg
from checker import check_exactly_once
from conftest import Publisher

from nilus_dagster.dagster import build_nilus_asset
from nilus_dagster.dagster.definitions import default_resources
from nilus_dagster.engine import measure_lag, run_pipeline
from nilus_dagster.manifest import parse_pipeline


def _pipeline(write_manifest, server, stream, subject):  # type: ignore[no-untyped-def]
    name = subject.rsplit(".", 1)[-1]
    path = write_manifest(
        name=name,
        address=f"nats+jetstream://{server.hostport}?subject={subject}&batch_size=50",
        stream=stream,
        dest_table=f"analytics.{name}",
    )
    return parse_pipeline(path)


def test_max_msgs_per_subject_past_the_position_is_a_gap(
    any_nats_server, stream_name, write_manifest
):
    publisher = Publisher(any_nats_server.url)
    a, b, c = (f"{stream_name}.{x}" for x in "abc")
    publisher.create_stream(stream_name, [f"{stream_name}.>"], max_msgs_per_subject=20)
    published_a: list[int] = []
    published_b: list[int] = []
    for i in range(10):
        published_a += publisher.publish_orders(a, 1, start=i)
        published_b += publisher.publish_orders(b, 1, start=i)
        publisher.publish_orders(c, 1, start=i)
    run_a = _pipeline(write_manifest, any_nats_server, stream_name, a)
    run_b = _pipeline(write_manifest, any_nats_server, stream_name, b)
    assert run_pipeline(run_a).position == published_a[-1]
    assert run_pipeline(run_b).position == published_b[-1]

    # 40 more of a (5 of b in between): a keeps its newest 20, so 20 of the new ones are gone
    # before they were read; b (15 messages) and c lose nothing.
    for i in range(40):
        published_a += publisher.publish_orders(a, 1, start=10 + i)
        if i < 5:
            published_b += publisher.publish_orders(b, 1, start=10 + i)
    lost = published_a[10:30]

    assert measure_lag(run_a).gap == 20
    assert measure_lag(run_b).gap == 0
    report = run_pipeline(run_a)
    assert report.gap == 20
    assert report.first_seq == published_a[30]
    result = check_exactly_once(report.table_uri, published_a, run_a.app_id, retention_lost=lost)
    assert result.ok and result.retention_lost == lost, str(result)
    again = run_pipeline(run_a)
    assert again.gap == 0 and again.messages == 0
    report_b = run_pipeline(run_b)
    assert report_b.gap == 0
    assert check_exactly_once(report_b.table_uri, published_b, run_b.app_id).ok


def test_purge_by_subject_fails_the_no_gap_check(
    nats_server, publisher, stream_name, write_manifest
):
    a, b = f"{stream_name}.a", f"{stream_name}.b"
    publisher.create_stream(stream_name, [f"{stream_name}.>"])
    published = publisher.publish_orders(a, 5)
    publisher.publish_orders(b, 3)
    pipeline = _pipeline(write_manifest, nats_server, stream_name, a)
    asset = build_nilus_asset(pipeline)
    resources = default_resources()

    with dg.instance_for_test() as instance:
        dg.materialize([asset], instance=instance, resources=resources)  # position 5
        for i in range(8):  # a and b interleaved after the position
            published += publisher.publish_orders(a, 1, start=5 + i)
            publisher.publish_orders(b, 1, start=3 + i)
        publisher.purge(stream_name, subject=a, keep=3)  # 5 of the 8 new a's go
        result = dg.materialize([asset], instance=instance, resources=resources)

    assert result.success
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not checks["no_gap"].passed
    assert checks["no_gap"].metadata["nats/gap"].value == 5
    [materialization] = result.asset_materializations_for_node(asset.node_def.name)
    assert materialization.metadata["nats/gap"].value == 5
    lost = published[5:10]
    result = check_exactly_once(
        str(pipeline.table_location().uri), published, pipeline.app_id, retention_lost=lost
    )
    assert result.ok and result.retention_lost == lost, str(result)
