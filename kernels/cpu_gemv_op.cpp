// The CPU kernel of the `auto_quant::cpu_gemv` op in C++, so that a torch.compile'd graph reaches the C GEMV
// through the dispatcher alone (about 8 µs a call) instead of through the op's Python implementation (about
// 35 µs: a SmolLM2 decode step makes ~210 calls).
//
// auto_quant/inference/cpu_gemv.py builds it at the first trace of the op with the C++ compiler against
// torch's headers and libraries, links it to the C library built from cpu_gemv.c (whose `aq_gemm` it calls)
// and loads it with torch.ops.load_library. The op's schema and its fake (shape) function stay in Python; the
// Python implementation stays registered for CompositeExplicitAutograd, which a kernel registered for the CPU
// key takes precedence over. Both implementations make the same aq_gemm call, so they agree bit for bit.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

extern "C" int aq_gemm(const float *x, float *y, int64_t M, int64_t N, int64_t K, const uint8_t *data, int32_t bits,
                       int32_t zero, const float *bias, int32_t threads);

namespace {

at::Tensor cpu_gemv(const at::Tensor &x, const at::Tensor &data, int64_t bits, int64_t zero,
                    const std::optional<at::Tensor> &bias, int64_t out_features) {
    TORCH_CHECK(x.device().is_cpu() && data.device().is_cpu(), "auto_quant::cpu_gemv takes CPU tensors");
    TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous(),
                "auto_quant::cpu_gemv: data must be the packed layer's contiguous uint8 buffer");
    TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous()),
                "auto_quant::cpu_gemv: bias must be float32 and contiguous");
    if (x.scalar_type() != at::kFloat || !x.is_contiguous()) {
        return cpu_gemv(x.contiguous().to(at::kFloat), data, bits, zero, bias, out_features).to(x.scalar_type());
    }
    const int64_t in_features = x.size(-1), rows = x.numel() / in_features;
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = out_features;
    at::Tensor y = at::empty(shape, x.options());
    const int rc = aq_gemm(x.const_data_ptr<float>(), y.mutable_data_ptr<float>(), rows, out_features, in_features,
                           data.const_data_ptr<uint8_t>(), static_cast<int32_t>(bits), static_cast<int32_t>(zero),
                           bias.has_value() ? bias->const_data_ptr<float>() : nullptr,
                           static_cast<int32_t>(at::get_num_threads()));
    TORCH_CHECK(rc != -1, "auto_quant::cpu_gemv could not allocate scratch for ", rows, " activation rows");
    TORCH_CHECK(rc == 0, "auto_quant::cpu_gemv takes a layout of 4 or 8 bits, not ", bits);
    return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(auto_quant, CPU, m) { m.impl("cpu_gemv", &cpu_gemv); }
