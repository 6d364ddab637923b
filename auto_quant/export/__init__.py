"""Exporters: one interface, a registry as data, one packing module (``export.packing``)."""

from __future__ import annotations

from pathlib import Path

from auto_quant.errors import FormatNotAvailableError
from auto_quant.export.auto_round import AutoRoundExporter
from auto_quant.export.gguf.writer import exporters as gguf_exporters
from auto_quant.export.awq import AwqExporter
from auto_quant.export.gptq import GptqExporter
from auto_quant.export.llm_compressor import LlmCompressorExporter
from auto_quant.export.base import (
    Capabilities,
    ExportContext,
    Exporter,
    QuantizedLayer,
    check_output_dir,
    write_atomically,
)

EXPORTERS: dict[str, Exporter] = {
    e.name: e for e in (AutoRoundExporter(), GptqExporter(), AwqExporter(), LlmCompressorExporter(), *gguf_exporters())
}


def parse_formats(formats: str | list[str] | tuple[str, ...]) -> list[str]:
    names = [f.strip() for f in formats.split(",")] if isinstance(formats, str) else list(formats)
    names = [n for n in names if n]
    if not names:
        raise FormatNotAvailableError("no export format given; use e.g. format='auto_round'")
    for n in names:
        if n not in EXPORTERS:
            raise FormatNotAvailableError(
                f"export format {n!r} is not available; available formats: {', '.join(sorted(EXPORTERS))}"
            )
    return names


def get_exporter(name: str) -> Exporter:
    return EXPORTERS[parse_formats(name)[0]]


def export(ctx: ExportContext, output_dir: str | Path, formats: str | list[str]) -> dict[str, Path]:
    """Write every requested format; one format → ``output_dir``, several → ``output_dir/<format>``."""
    names = parse_formats(formats)
    for n in names:
        EXPORTERS[n].capabilities.check(n, ctx.specs)
    out: dict[str, Path] = {}
    if len(names) == 1:
        out[names[0]] = write_atomically(output_dir, lambda tmp: EXPORTERS[names[0]].write(ctx, tmp))
        return out

    def write_all(tmp: Path):
        for n in names:
            sub = tmp / n.replace(":", "-")
            sub.mkdir()
            EXPORTERS[n].write(ctx, sub)

    root = write_atomically(output_dir, write_all)
    return {n: root / n.replace(":", "-") for n in names}


__all__ = [
    "Capabilities",
    "ExportContext",
    "Exporter",
    "QuantizedLayer",
    "EXPORTERS",
    "check_output_dir",
    "export",
    "get_exporter",
    "parse_formats",
    "write_atomically",
]
