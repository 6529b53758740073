"""The compile report: assembled once from the stages' typed results, checked against its JSON
Schema (quantflow/report.schema.json), written as report.json, rendered as text.

Schema "quantflow.report/2" (all sizes in bytes, latencies in ms, accuracies in percent):
  schema      "quantflow.report/2"
  model       {name, source, input_shape, batch}; batch = {mode: "dynamic"} or, for a
              graph exported at a fixed batch, {mode: "rewritten" (made dynamic, proven) |
              "static" (run in chunks of it), exported_batch, rewritten: [node] (for static:
              tried and rejected), reason (why static)}
  target      target name;  bits  "8" | "mixed";  config  the CompileConfig (config.py)
  host        the CPU everything was measured on: {machine, model, cores, features (the ISA
              flags int8 kernels use), isa_class (targets/ort_isa.py)}
  versions    {package: version} of torch, onnx, onnxruntime, numpy, tvm, xgboost, quantflow
  passes      {before: {conv, batch_norm, linear, ops}, after: {...}, fired: {pass: n}, seconds}
  calibration {calibrator, equalize, samples, data, candidates: {name: score}}
  search      mixed precision only: the search summary (quantflow.search.SearchResult.to_dict
              without trials/hessian) + latency_check {table_ms, measured_ms,
              measured_over_table}
  repair      --optimize-time only: worst-tensor repair {sqnr_db_before, sqnr_db_after,
              seconds, repaired [{tensor, contribution_db, tool, scale_before, scale_after,
              gain_db}], worst [{tensor, contribution_db}] (top 10), skipped_tools {tool: why}}
              (dB: output SQNR of the simulation on the calibration scoring subset)
  rounding    --optimize-time only (quantflow/fidelity.py): learned_on (samples), validation
              {samples, nearest_sqnr_db, learned_sqnr_db, kept} | null, blocks, resumed, and
              learned rounding {layers, seconds, output_mse_gain_db
              {layer: dB of the layer's output error, nearest vs learned, calibration data}}
  device      what the artifact is for: {requested, resolved, exact_on: [isa_class],
              pair_limit | null, host_exact, warning?} (ort; tvm/trt: {requested, resolved})
  parity      ort: the parity gate (quantflow.verify): {isas, samples, bound_steps, passed,
              max_steps {isa: steps}, repaired {layer: fix}, skipped {isa: why},
              off_layers [{isa, tensor, layer, op, max_steps, off, elements}]}
  portability {device, layers: {layer: {op, fix: "pairs" | "7bit", pairs_over_bound,
              pair_bound, channels_changed, channels, max_scale_growth, weight_sqnr_db
              {unconstrained, pair_limited}, why}}, simulation_sqnr_db {portable,
              unconstrained, cost, samples} (when a layer changed)}
  artifacts   {fp32, quantized, plan, report}: paths
  runtime     target-specific facts (e.g. ORT: integer kernels found, layers left in float,
              float_op_reasons {op type: why it has no integer kernel here})
  quality     {fp32: Quality, quantized: Quality (runtime), simulation: Quality (torch, on
               the first 1000 samples), accuracy_drop: points | null,
               runtime_vs_simulation_sqnr_db, eval_data, eval_samples}
              Quality = {samples, accuracy, agreement, sqnr_db, kl}
  latency     {fp32: Latency, quantized: Latency, speedup} | {unavailable: why}
              Latency = {median_ms, p90_ms, mean_ms, runs, warmup, threads, batch, device
                         (CPU description), per_layer_ms: {fx node: ms} | null, iqr_ms,
                         mad_ms (spread of the same timed runs: interquartile range, median
                         absolute deviation; what `quantflow gate` weighs latency noise by)}
  size        {fp32_bytes, quantized_bytes, ratio, weights_fp32_bytes,
              weights_quantized_bytes}
  layers      [{name, op, plan, weight_bits, runs_integer, params}]
  analysis    per-layer parity of FP32, simulation and runtime (quantflow/layer_debug.py,
              whose docstring has the fields) | {error: why it could not run}
  gate        {max_drop, passed, reason[, measure, value][, max_latency_ms, latency_ms]}
  stages      {stage: seconds} (pipeline.STAGES);  compile_seconds  total wall time
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantflow.report_text import render

SCHEMA = "quantflow.report/2"
#: report.json's JSON Schema (draft 2020-12), checked by the tests on every report they write
SCHEMA_FILE = Path(__file__).with_name("report.schema.json")


@dataclass
class Report:
    """report.json as a dict (what tools and tests read), made by `assemble`."""

    data: dict[str, Any] = field(default_factory=lambda: {"schema": SCHEMA})

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.data, indent=2, default=_json_default) + "\n")

    def render(self) -> str:
        return render(self.data)


@dataclass(frozen=True)
class Sections:
    """Every stage's result, as the report needs it (filled by pipeline.compile)."""

    model: dict[str, Any]
    target: str
    bits: str
    config: dict[str, Any]
    host: dict[str, Any]
    versions: dict[str, str]
    passes: dict[str, Any]
    calibration: dict[str, Any]
    search: dict[str, Any] | None
    rounding: dict[str, Any] | None
    repair: dict[str, Any] | None
    device: dict[str, Any]
    parity: dict[str, Any] | None
    portability: dict[str, Any]
    artifacts: dict[str, str]
    runtime: dict[str, Any]
    quality: dict[str, Any]
    latency: dict[str, Any]
    size: dict[str, Any]
    layers: list[dict[str, Any]]
    gate: dict[str, Any]
    stages: dict[str, float]
    compile_seconds: float
    analysis: dict[str, Any] | None = None


def assemble(s: Sections) -> Report:
    """The report of one compile, in the schema's key order."""
    data: dict[str, Any] = {"schema": SCHEMA, "model": s.model, "target": s.target,
                            "bits": s.bits, "config": s.config, "host": s.host,
                            "versions": s.versions, "passes": s.passes,
                            "calibration": s.calibration}
    if s.search is not None:
        search = dict(s.search)
        measured = s.latency.get("quantized", {}).get("median_ms")
        if measured is not None:
            # the search priced candidates with per-layer tables: how the real model compares
            predicted = search["best"]["latency_ms"]
            search["latency_check"] = {
                "table_ms": predicted, "measured_ms": measured,
                "measured_over_table": round(measured / predicted, 3) if predicted else None}
        data["search"] = search
    if s.rounding is not None:
        data["rounding"] = s.rounding
    if s.repair is not None:
        data["repair"] = s.repair
    data["device"] = s.device
    if s.parity is not None:
        data["parity"] = s.parity
    data.update(portability=s.portability, artifacts=s.artifacts, runtime=s.runtime,
                quality=s.quality, latency=s.latency, size=s.size, layers=s.layers)
    if s.analysis is not None:
        data["analysis"] = s.analysis
    data.update(gate=s.gate, stages=s.stages, compile_seconds=s.compile_seconds)
    return Report(data)


def validate_report(data: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError when `data` does not follow report.schema.json."""
    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.validate(json.loads(json.dumps(data, default=_json_default)), schema)


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)
