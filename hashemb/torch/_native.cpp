// FastEmbedding / FastMultiEmbedding's CPU lookup as a C++ autograd function
// over hashemb/embed.h's kernels (the ones hashemb._cpu._embed runs).
//
// Why C++: at batch 128 torch's whole nn.Embedding step costs ~100 us, and a
// Python torch.autograd.Function adds ~40 us of interpreter work around
// kernels that take 3-5 us. Built on first use by torch.utils.cpp_extension
// (hashemb/torch/_native.py); without a compiler the modules fall back to the
// Python function. Checks that Python already made (layout, index dtype,
// shapes) are not repeated; a bad index throws IndexError carrying
// "hashemb-bad-index=<flat position>", which the Python side words like every
// other hashemb IndexError.
// Not <torch/extension.h>: it pulls in all of torch (nn, optim, serialisation)
// and doubles the first-use build (59 s -> 36 s for this object on 2 cores).
#include <ATen/Dispatch.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/types.h>

#include <algorithm>
#include <new>
#include <vector>

#include "hashemb/embed.h"

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

void throw_bad_index(int64_t bad)
{
    TORCH_CHECK_INDEX(false, "hashemb-bad-index=", bad);
}

Tensor gather(const Tensor& weight, const Tensor& indices, const Tensor& layout, int64_t total,
              bool single)
{
    const int64_t T = layout.size(1), N = indices.numel() / T;
    // the weight must hold the layout's tables (the kernels index it by the
    // layout alone): the end of the last packed table, base + rows * dims
    const int64_t* L = layout.data_ptr<int64_t>();
    int64_t size = 0;
    for (int64_t t = 0; t < T; ++t)
        size = std::max(size, L[t] + L[3 * T + t] * L[T + t]);
    TORCH_CHECK_VALUE(weight.numel() == size, "weight: expected ", size,
                      " floats (the layout's tables), got ", weight.numel());
    std::vector<int64_t> shape = single ? indices.sizes().vec() : std::vector<int64_t>{N};
    shape.push_back(total);
    // a negative view's bits are its negation: resolved, as the kernel reads raw memory
    Tensor w = weight.resolve_neg().contiguous();
    Tensor out = torch::empty(shape, w.options());
    int64_t bad = -1;
    AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "hashemb_gather", [&] {
        AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "hashemb_gather", [&] {
            bad = he_embed_gather(w.data_ptr<scalar_t>(), indices.data_ptr<index_t>(), N, T,
                                  layout.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), total);
        });
    });
    if (bad >= 0)
        throw_bad_index(bad);
    return out;
}

Tensor scatter(const Tensor& grad, const Tensor& indices, const Tensor& layout, int64_t size)
{
    const int64_t T = layout.size(1), N = indices.numel() / T;
    Tensor g = grad.resolve_neg().contiguous();   // (a negative view: its values)
    // not torch::zeros: which pages the rows touch decides how to zero (embed.h)
    void* buf = he_embed_grad_buffer(size, g.element_size(), indices.numel(), N ? g.numel() / N / T : 0);
    if (buf == nullptr)
        throw std::bad_alloc();
    Tensor out = torch::from_blob(buf, {size}, [](void* p) { he_embed_grad_free(p); }, g.options());
    int64_t bad = -1;
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "hashemb_scatter", [&] {
        AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "hashemb_scatter", [&] {
            bad = he_embed_scatter(g.data_ptr<scalar_t>(), indices.data_ptr<index_t>(), N, T,
                                   N ? g.numel() / N : 0, layout.data_ptr<int64_t>(),
                                   out.data_ptr<scalar_t>(), size);
        });
    });
    if (bad >= 0)
        throw_bad_index(bad);
    return out;
}

struct Lookup : public torch::autograd::Function<Lookup> {
    static Tensor forward(AutogradContext* ctx, const Tensor& weight, const Tensor& indices,
                          const Tensor& layout, int64_t total, bool single)
    {
        ctx->save_for_backward({indices, layout});
        ctx->saved_data["shape"] = weight.sizes();   // its product is the layout's size
        return gather(weight, indices, layout, total, single);
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads)
    {
        // the scatter records no graph: second-order terms would be missing
        TORCH_CHECK(!torch::autograd::GradMode::is_enabled(),
                    "FastEmbedding: double backward (create_graph=True) is not supported: its "
                    "gradient comes from kernels that record no graph, so second-order terms "
                    "through it would be missing; take the gradient without create_graph");
        variable_list saved = ctx->get_saved_variables();
        std::vector<int64_t> shape = ctx->saved_data["shape"].toIntVector();
        int64_t size = 1;
        for (int64_t s : shape)
            size *= s;
        Tensor dw = scatter(grads[0], saved[0], saved[1], size);
        return {dw.view(shape), Tensor(), Tensor(), Tensor(), Tensor()};
    }
};

Tensor lookup(const Tensor& weight, const Tensor& indices, const Tensor& layout, int64_t total,
              bool single)
{
    return Lookup::apply(weight, indices, layout, total, single);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("lookup", &lookup, "FastEmbedding's CPU lookup with its backward (hashemb/embed.h)");
}
