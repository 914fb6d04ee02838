"""Spark: the cluster a run names (RunConfig.data_prep_cluster_id: `sc://host:port` for Spark Connect, or a master
URL such as `local[2]` or `spark://host:7077`), a session for it, a source's input as a DataFrame (spark_input),
and what its executors decode (spark_partition_records).

Spark reads files and tables at locations its executors can see, and its executors decode their partitions with
the in-process decoder (tessera.core.sources.source.decode_units), so the same data gives the same records and
messages. A folder's documents are listed by the driver (tessera.core.sources.files.text_files), not by Spark
(whose listing drops every name starting with `_`, even one named explicitly), and each executor reads the files
it is given. Table metadata (the pinned version, the schema) is read in-process: the table location must be
readable from the driver too. pyspark is imported only when a session starts.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from tessera.core.errors import ConfigError, TesseraError
from tessera.core.sources.columns import batches_to_rows
from tessera.core.sources.files import document_name, text_files
from tessera.core.sources.source import BadRecord, Record, Source, decode_units, reading

if TYPE_CHECKING:
    import pyarrow as pa

_CLUSTER = re.compile(r"^(sc://.+|local(\[(\d+|\*)(,\d+)?\])?|spark://.+|yarn|k8s://.+)$")
_DOCUMENTS_PER_PARTITION = 1024  # a folder's documents per Spark partition: executors share the work


def check_cluster(cluster: str) -> None:
    if not _CLUSTER.match(cluster):
        raise ConfigError(
            f"data_prep_cluster_id {cluster!r}: expected a Spark Connect URL (sc://host:port) or a Spark "
            "master URL (local[*], local[2], spark://host:7077, yarn, k8s://...)"
        )


@contextmanager
def spark_input(source: Source, cluster: str):
    """The source's input units as a Spark DataFrame, for executors to decode with spark_partition_records:
    a JSONL file's lines (`value`, bytes), a folder's documents (`path`, relative to the folder: listed here,
    as in-process, and read by the executors), or a table's columns at the pinned version. Engine failures
    while the block runs become one message naming the source."""
    with spark_session(cluster) as spark, reading(source, f"Spark at {cluster}"):
        try:
            if source.kind == "jsonl":
                yield spark.read.text(source.location).selectExpr("CAST(value AS BINARY) AS value")
            elif source.kind == "text_folder":  # not Spark's file reader: it drops `_thread.txt`, even named
                files, _ = text_files(Path(source.location), source.path)
                paths = spark.createDataFrame([(rel,) for rel, _ in files], "path string")
                yield paths.repartition(len(files) // _DOCUMENTS_PER_PARTITION + 1)  # Spark Connect sends a list as one
            else:
                table = spark.read.format("delta").option("versionAsOf", source.version).load(source.location)
                yield table.select(*dict.fromkeys(source.fields.values()))
        except Exception as exc:  # classic Spark fails at load(), Spark Connect when the rows are asked for
            if "DATA_SOURCE_NOT_FOUND" in str(exc):
                raise TesseraError(
                    f"{source.display}: the Spark at {cluster} has no Delta Lake reader (the delta-spark jars are not "
                    "on its classpath, and Tessera does not download them); start Spark with them, use a Spark Connect "
                    "server that reads Delta, or leave data_prep_cluster_id unset to read the table in-process"
                ) from None
            raise


def spark_partition_records(source: Source, batches: Iterable[pa.RecordBatch]) -> Iterator[Record | BadRecord]:
    """On a Spark executor: one partition of spark_input, decoded as read_records decodes in-process. A numbered
    record's `where` is only its position in the partition: partitions come in no fixed order, so an executor
    counts errors and the driver names them (tessera.core.records.named_errors). Documents are named by their file
    (links out of a volume were refused when the source was resolved)."""
    rows = batches_to_rows(batches)
    if source.kind == "jsonl":
        units = (row["value"] for row in rows)
    elif source.kind == "text_folder":
        folder = Path(source.location)
        units = ((document_name(source.path, row["path"]), (folder / row["path"]).read_bytes()) for row in rows)
    else:
        units = rows
    return decode_units(source, units, lambda k: k)


def _probe(cluster: str) -> None:
    """Fail fast when nothing listens at a Spark Connect URL; the client itself retries for ten minutes."""
    url = urlparse("grpc" + cluster.split(";")[0].removeprefix("sc"))
    try:
        socket.create_connection((url.hostname, url.port or 15002), timeout=10).close()
    except OSError as exc:
        raise TesseraError(f"data_prep_cluster_id {cluster}: no Spark Connect server answers there ({exc})") from None


@contextmanager
def spark_session(cluster: str):
    """A Spark session for `cluster`.

    A Spark Connect session is opened for this read and closed after it (cheap; the server stays up),
    through the Connect builder itself, which leaves this process free to start classic Spark later.
    A classic session starts a JVM, so it is reused: the one already running in this process (it must
    be for the same master) or a new one, left running for later reads.
    """
    remote = cluster.startswith("sc://")
    try:
        if remote:
            from pyspark.sql.connect.session import SparkSession as ConnectSession

            _probe(cluster)
            session = ConnectSession.builder.remote(cluster).create()
        else:
            from pyspark.sql import SparkSession

            builder = SparkSession.builder.master(cluster).appName("tessera").config("spark.ui.showConsoleProgress", "false")
            if cluster.startswith("local"):  # one JVM here: loopback only, no web UI; workers run this interpreter
                os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
                builder = builder.config("spark.driver.bindAddress", "127.0.0.1").config("spark.driver.host", "127.0.0.1")
                builder = builder.config("spark.ui.enabled", "false")
            session = builder.getOrCreate()
    except TesseraError:
        raise
    except Exception as exc:
        raise TesseraError(f"data_prep_cluster_id {cluster}: cannot start a Spark session: {exc}") from exc
    if not remote and session.sparkContext.master != cluster:
        raise TesseraError(
            f"data_prep_cluster_id {cluster}: this process already runs Spark at {session.sparkContext.master}; "
            "one process can hold one classic Spark session"
        )
    try:
        yield session
    finally:
        if remote:
            session.stop()
