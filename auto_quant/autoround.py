"""``AutoRound``: the public API, compatible with Intel auto-round's common path."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from auto_quant.config import QuantConfig, TuningConfig, parse_layer_config, resolve_device
from auto_quant.errors import CalibrationError, ConfigError
from auto_quant.export import ExportContext, check_output_dir, export, parse_formats
from auto_quant.quant.spec import QuantSpec
from auto_quant.tuning.pipeline import QuantizationOutcome, plan_layers, quantize_rtn, quantize_tuned

log = logging.getLogger(__name__)

_IGNORED_COMPAT = {"amp", "enable_norm_bias_tuning", "enable_quanted_input", "not_use_best_mse",
                   "dynamic_max_gap", "super_bits", "super_group_size", "to_quant_block_names", "disable_opt_rtn"}


class AutoRound:
    """Tune a causal LM's linear weights to ``bits`` with sign-gradient descent, block by block.

    ``model`` is an ``nn.Module`` or a path (model directory, ``.gguf`` file, hub id);
    ``tokenizer`` may be None when ``dataset`` is token ids. After :meth:`quantize` the
    in-memory ``model`` is the fake-quantized model.
    """

    def __init__(
        self,
        model: nn.Module | str | os.PathLike | None,
        tokenizer=None,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        iters: int = 200,
        nsamples: int = 128,
        seqlen: int = 2048,
        batch_size: int = 8,
        gradient_accumulate_steps: int = 1,
        lr: float | None = None,
        minmax_lr: float | None = None,
        dataset=None,
        layer_config: dict | None = None,
        seed: int = 42,
        device: str | None = "auto",
        quant_lm_head: bool = False,
        scale_dtype: str | torch.dtype = "fp16",
        data_type: str = "int",
        act_bits: int = 16,
        enable_minmax_tuning: bool = True,
        init_search: bool = True,
        low_gpu_mem_usage: bool = False,
        progress: bool = True,
        fused_layers: str = "harmonise",
        scheme: str | None = None,
        device_map=None,
        enable_torch_compile: bool | None = None,
        cuda_graphs: bool = False,
        **kwargs,
    ):
        unknown = set(kwargs) - _IGNORED_COMPAT
        if unknown:
            raise ConfigError(f"unknown AutoRound argument(s): {', '.join(sorted(unknown))}")
        if data_type not in ("int", "int_sym", "int_asym"):
            raise ConfigError(f"data_type={data_type!r} is not supported; auto_quant tunes integer weights ('int')")
        if act_bits < 16:
            raise ConfigError("act_bits < 16 (activation quantization) is not supported; weights-only quantization")
        scheme_name = scheme  # "gguf:<type>" or None; ``scheme`` below is the base QuantSpec
        scheme = QuantSpec(bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype)
        tuning = TuningConfig(
            iters=iters, nsamples=nsamples, seqlen=seqlen, batch_size=min(batch_size, nsamples),
            gradient_accumulate_steps=gradient_accumulate_steps, lr=lr, minmax_lr=minmax_lr,
            enable_minmax_tuning=enable_minmax_tuning, init_search=init_search, seed=seed,
            compile=bool(enable_torch_compile), cuda_graphs=bool(cuda_graphs),
        )
        self.config = QuantConfig(
            scheme=scheme, tuning=tuning, layer_rules=parse_layer_config(layer_config, scheme),
            quant_lm_head=quant_lm_head, device=device or "auto", low_gpu_mem_usage=low_gpu_mem_usage,
            fused_layers=fused_layers,
        )
        if device_map is None and isinstance(device, str) and "," in device:
            device_map = device  # "0,1": the CLI's --device list
        from auto_quant.tuning.placement import parse_device_map

        self.device_request = parse_device_map(device_map)  # None: everything on the one tuning device
        if self.device_request is not None and (device in (None, "auto") or device_map is device):
            self.device = torch.device(self.device_request.devices[0])
        else:
            self.device = resolve_device(self.config.device)
        self.placement = None  # the PlacementPlan of the last quantize() with a device_map
        if not isinstance(model, nn.Module):
            from auto_quant.models.loading import load_model

            model, loaded_tok = load_model(model)
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        self.model = model
        self.tokenizer = tokenizer
        self.scheme = scheme_name
        if scheme_name is not None:  # "gguf:<type>": llama.cpp's per-tensor types, tuned in their own grids
            from auto_quant.export.gguf import gguf_quant_config, is_gguf_scheme

            if not is_gguf_scheme(scheme_name):
                raise ConfigError(f"scheme={scheme_name!r} is not supported; use 'gguf:<type>' (e.g. 'gguf:q4_k_m') "
                                  "or bits/group_size/sym")
            self.config, _ = gguf_quant_config(self.model, scheme_name, self.config)
        self.dataset = dataset
        self.progress = progress
        self.outcome: QuantizationOutcome | None = None
        self.calibration_description: str | None = None
        # fail fast on layer_config that matches nothing, before any calibration work
        _, self.specs, _ = plan_layers(self.model, self.config)

    # ------------------------------------------------------------------ stages
    def calibration_samples(self) -> list[dict]:
        from auto_quant.calib import build_calibration

        t = self.config.tuning
        if isinstance(self.dataset, (list, tuple)) and len(self.dataset) == 0:
            raise CalibrationError("the calibration dataset is empty; give at least one text or token sequence")
        calib = build_calibration(self.dataset, self.tokenizer, t.nsamples, t.seqlen, t.seed, model=self.model)
        self.calibration_description = calib.description
        return calib.as_model_inputs()

    def placement_plan(self):
        """The memory plan over the ``device_map`` devices (None without one); raises PlacementError when
        the tuning cannot fit, naming what would."""
        if self.device_request is None:
            return None
        from auto_quant.tuning import placement as pl

        primary = str(self.device if self.device.index is not None or self.device.type == "cpu"
                      else torch.device(self.device.type, 0))
        devices = list(dict.fromkeys([primary, *self.device_request.devices]))
        t = self.config.tuning
        dtype = next(self.model.parameters()).dtype
        settings = pl.PlanSettings(nsamples=t.nsamples, seqlen=t.seqlen, batch_size=t.batch_size, dtype=dtype,
                                   group_size=self.config.scheme.group_size, tune_minmax=t.enable_minmax_tuning,
                                   cache="cpu" if self.config.low_gpu_mem_usage else "auto")
        plan = pl.plan_placement(pl.ModelShape.from_model(self.model), settings, pl.device_budgets(devices),
                                 pl.available_cpu_bytes(), self.device_request.rules)
        log.info("%s", plan.describe())
        return plan

    def quantize(self):
        """Run the tuning (or RTN when ``iters == 0``); returns ``(model, layer_config)`` like auto-round."""
        # iters == 0 with a GGUF scheme is importance-weighted RTN (imatrix-style): calibration activations
        # weight the clipping search, so it runs through the tuning pipeline too
        tuned = self.config.tuning.iters > 0 or (self.config.tuning.init_search and self.scheme is not None)
        if not tuned:
            self.placement = None
            self.outcome = quantize_rtn(self.model, self.config)
        else:
            self.placement = self.placement_plan()
            self.outcome = quantize_tuned(self.model, self.config, self.calibration_samples(), self.device,
                                          progress=self.progress, placement=self.placement)
        layer_config = {n: (s.to_dict() if s else {"bits": 16}) for n, s in self.outcome.specs.items()}
        return self.model, layer_config

    def export_context(self) -> ExportContext:
        if self.outcome is None:
            raise ConfigError("call quantize() before saving")
        t = self.config.tuning
        return ExportContext(
            model=self.model, tokenizer=self.tokenizer, layers=self.outcome.layers, block_names=self.outcome.block_names,
            scheme=self.config.scheme, specs=self.outcome.specs,
            tuning={"iters": t.iters, "nsamples": t.nsamples, "seqlen": t.seqlen, "batch_size": t.batch_size,
                    "lr": t.lr if t.lr is not None else (1.0 / t.iters if t.iters else None),
                    "minmax_lr": t.minmax_lr, "gradient_accumulate_steps": t.gradient_accumulate_steps, "seed": t.seed},
        )

    def save_quantized(self, output_dir: str | os.PathLike, format: str = "auto_round", inplace: bool = True) -> dict[str, Path]:
        return export(self.export_context(), output_dir, format)

    def check_save_target(self, output_dir, format: str = "auto_round") -> None:
        """Validate the output directory and format(s) before spending time on tuning."""
        from auto_quant.export import EXPORTERS

        check_output_dir(output_dir)
        for name in parse_formats(format):
            EXPORTERS[name].capabilities.check(name, self.specs)
            check_model = getattr(EXPORTERS[name], "check_model", None)
            if check_model is not None:  # checks that need the model (e.g. GGUF architectures)
                check_model(self.model)

    def quantize_and_save(self, output_dir: str | os.PathLike = "tmp_autoround", format: str = "auto_round"):
        self.check_save_target(output_dir, format)
        self.quantize()
        paths = self.save_quantized(output_dir, format=format)
        return self.model, paths
