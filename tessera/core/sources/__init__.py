"""Where training data comes from: a user's data path resolved to a Source, and its records read in a stream.

One module per kind of input, above what they share and below the one place that picks among them:

    files        local files and folders as paths: a folder's .txt documents, a document's name, a file's hash
    source       Source, Record, BadRecord, the names of tables and dataset splits, the one record decoder
    columns      tables and datasets: which column feeds which record field, rows in bounded batches
    local        local files and folders: checked against the task, a JSONL file read
    delta        Delta tables: the catalog config, the pinned version, rows read by DataFusion
    hf_datasets  Hugging Face dataset splits: a local dataset directory or the datasets cache
    spark        Spark: the cluster, its session, a source's input as a DataFrame, what executors decode
    resolve      how a data path is read (its rules), resolve_source, read_records

This module only re-exports the names the rest of Tessera imports; the modules above import one another
directly, never through it. pyarrow, deltalake, datasets and pyspark are imported where they are used, so
importing the package stays cheap.
"""

from tessera.core.sources.delta import table_location
from tessera.core.sources.resolve import classify, read_records, resolve_source
from tessera.core.sources.source import BadRecord, Record, Source
from tessera.core.sources.spark import spark_input, spark_partition_records

__all__ = [
    "BadRecord",
    "Record",
    "Source",
    "classify",
    "read_records",
    "resolve_source",
    "spark_input",
    "spark_partition_records",
    "table_location",
]
