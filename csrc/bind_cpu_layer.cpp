// Python binding of the fused CPU decoder layers (cpu_layer.h): genfuse._C.CpuDecoder holds a
// Llama-family model's layer weights (numpy views, kept alive by the object) checked once at
// construction; its forward() runs layers over one engine step. Every array is checked (numpy,
// dtype, shape, C order, writability, no aliasing of outputs) and every index the step reads
// is range-checked before any memory is touched; the computation runs without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include <unistd.h>

#include "cpu_layer.h"
#include "pyargs.h"

namespace py = pybind11;

namespace {

using genfuse::pyargs::dims;
using genfuse::pyargs::shape_of;

// A numpy array of `kind`/`itemsize` ('f' 4, 'i' 4, 'u' 1), C-contiguous, with `shape` (-1: any
// extent), writable if asked; ValueError/TypeError naming the argument otherwise.
py::array arg_array(const py::handle& h, const std::string& name, char kind, int itemsize, std::vector<int64_t> shape,
                    bool writable = false) {
    if (!py::isinstance<py::array>(h))
        throw py::type_error(name + " must be a numpy.ndarray, not " + genfuse::pyargs::type_name(h.ptr()));
    auto a = py::reinterpret_borrow<py::array>(h);
    const char* want = kind == 'f' ? (itemsize == 2 ? "float16" : "float32") : kind == 'i' ? "int32" : "uint8";
    if (a.dtype().kind() != kind || a.itemsize() != itemsize || a.dtype().byteorder() == '>')
        throw py::value_error(name + " must be " + want + ", got " + std::string(py::str(a.dtype())));
    bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
    for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || a.shape(i) == shape[i];
    if (!ok) {
        for (size_t i = 0; i < shape.size() && static_cast<py::ssize_t>(i) < a.ndim(); ++i)
            if (shape[i] < 0) shape[i] = a.shape(i);
        throw py::value_error(name + " must have shape " + dims(shape) + ", got " + shape_of(a));
    }
    if ((a.flags() & py::array::c_style) == 0) throw py::value_error(name + " must be C-contiguous");
    if (writable && !a.writeable()) throw py::value_error(name + " must be writable");
    return a;
}

bool overlap(const py::array& a, const py::array& b) {
    const auto* pa = static_cast<const char*>(a.data());
    const auto* pb = static_cast<const char*>(b.data());
    return a.nbytes() > 0 && b.nbytes() > 0 && pa < pb + b.nbytes() && pb < pa + a.nbytes();
}

// See bind_quant_matmul.cpp: a daemon thread must not take the GIL back during finalization.
template <class F>
void without_gil(F&& f) {
    py::gil_scoped_release nogil;
    f();
    if (_Py_IsFinalizing()) {
        nogil.disarm();
        for (;;) pause();
    }
}

class CpuDecoder {
  public:
    CpuDecoder(int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t intermediate,
               double eps, const py::list& layers) {
        if (hidden <= 0 || num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 || intermediate <= 0)
            throw py::value_error("hidden, num_heads, num_kv_heads, head_dim and intermediate must be positive");
        if (num_heads % num_kv_heads)
            throw py::value_error("num_heads=" + std::to_string(num_heads) + " is not a multiple of num_kv_heads=" +
                                  std::to_string(num_kv_heads));
        if (!(eps > 0)) throw py::value_error("eps must be positive, got " + std::to_string(eps));
        dims_ = {hidden, num_heads, num_kv_heads, head_dim, intermediate, static_cast<float>(eps)};
        const int64_t nqkv = (num_heads + 2 * num_kv_heads) * head_dim;
        for (size_t i = 0; i < layers.size(); ++i) {
            if (!py::isinstance<py::dict>(layers[i]))
                throw py::type_error("layers[" + std::to_string(i) + "] must be a dict");
            const auto d = py::reinterpret_borrow<py::dict>(layers[i]);
            const std::string p = "layers[" + std::to_string(i) + "].";
            genfuse::CpuLayer L{};
            L.input_norm = vec(d, p, "input_norm", hidden, false);
            L.qkv = weight(d, p, "qkv", nqkv, hidden);
            L.b_qkv = vec(d, p, "b_qkv", nqkv, true);
            L.o = weight(d, p, "o", hidden, num_heads * head_dim);
            L.b_o = vec(d, p, "b_o", hidden, true);
            L.post_norm = vec(d, p, "post_norm", hidden, false);
            L.gate_up = weight(d, p, "gate_up", 2 * intermediate, hidden);
            L.b_gate_up = vec(d, p, "b_gate_up", 2 * intermediate, true);
            L.down = weight(d, p, "down", hidden, intermediate);
            L.b_down = vec(d, p, "b_down", hidden, true);
            layers_.push_back(L);
        }
    }

    int num_layers() const { return static_cast<int>(layers_.size()); }

    void forward(const py::handle& h_, const py::handle& mlp_, const py::handle& pos_, const py::handle& slots_,
                 const py::handle& table_, const py::handle& lens_, const py::handle& qsl_, const py::handle& k_,
                 const py::handle& v_, const py::handle& cos_, const py::handle& sin_, int threads,
                 const py::object& path_, int act_bits, int first, const py::object& last_, bool mlp_in) {
        // The only arguments that run Python code (str, int conversion) come first.
        const genfuse::CpuPath path =
            path_.is_none() ? genfuse::default_cpu_path() : genfuse::parse_cpu_path(py::cast<std::string>(path_));
        if (!genfuse::cpu_path_supported(path))
            throw py::value_error(std::string("CPU path ") + genfuse::cpu_path_name(path) + " is not supported by this CPU");
        if (act_bits != 8 && act_bits != 16 && act_bits != 32)
            throw py::value_error("act_bits must be 8, 16 or 32, got " + std::to_string(act_bits));
        const int L = num_layers();
        const int last = last_.is_none() ? L : static_cast<int>(genfuse::pyargs::as_int64(last_, "last"));
        if (first < 0 || first > last || last > L)
            throw py::value_error("layers [first, last) = [" + std::to_string(first) + ", " + std::to_string(last) +
                                  ") must lie within [0, " + std::to_string(L) + "]");
        if (threads < 1) throw py::value_error("threads must be >= 1, got " + std::to_string(threads));
        const int64_t H = dims_.hidden, Hkv = dims_.num_kv_heads, D = dims_.head_dim;
        py::array h = arg_array(h_, "h", 'f', 4, {-1, H}, true);
        const int64_t N = h.shape(0);
        py::array mlp = arg_array(mlp_, "mlp_out", 'f', 4, {N, H}, true);
        const py::array pos = arg_array(pos_, "positions", 'i', 4, {N});
        const py::array slots = arg_array(slots_, "slot_mapping", 'i', 4, {N});
        const py::array table = arg_array(table_, "block_table", 'i', 4, {-1, -1});
        const int64_t B = table.shape(0);
        const py::array lens = arg_array(lens_, "seq_lens", 'i', 4, {B});
        const py::array qsl = arg_array(qsl_, "query_start_loc", 'i', 4, {B + 1});
        // float32 pools, or float16 ones (the engine's kv_cache_dtype="float16"), both alike
        const bool half = py::isinstance<py::array>(k_) && py::reinterpret_borrow<py::array>(k_).itemsize() == 2;
        py::array k = arg_array(k_, "k_pool", 'f', half ? 2 : 4, {L, -1, -1, Hkv, D}, true);
        py::array v = arg_array(v_, "v_pool", 'f', half ? 2 : 4, {L, k.shape(1), k.shape(2), Hkv, D}, true);
        const py::array cos = arg_array(cos_, "cos", 'f', 4, {-1, -1});
        const py::array sin = arg_array(sin_, "sin", 'f', 4, {cos.shape(0), cos.shape(1)});
        if (cos.shape(1) < 1 || 2 * cos.shape(1) > D)
            throw py::value_error("cos must have 1 to head_dim / 2 = " + std::to_string(D / 2) + " columns, got " +
                                  shape_of(cos));
        if (k.shape(2) < 1) throw py::value_error("the pools' block size must be positive, got " + shape_of(k));
        if (overlap(h, mlp)) throw py::value_error("h and mlp_out must not share memory");
        if (overlap(k, v)) throw py::value_error("k_pool and v_pool must not share memory");
        for (const py::array* out : {&h, &mlp})
            for (const py::array* pool : {&k, &v})
                if (overlap(*out, *pool)) throw py::value_error("h and mlp_out must not share memory with the pools");
        genfuse::CpuStep st{N, B, table.shape(1), static_cast<const int32_t*>(pos.data()),
                            static_cast<const int32_t*>(slots.data()), static_cast<const int32_t*>(table.data()),
                            static_cast<const int32_t*>(lens.data()), static_cast<const int32_t*>(qsl.data())};
        genfuse::CpuKv kv{k.mutable_data(), v.mutable_data(), L, k.shape(1), k.shape(2),
                          static_cast<const float*>(cos.data()), static_cast<const float*>(sin.data()), cos.shape(0),
                          cos.shape(1), half};
        const std::string bad = genfuse::check_step(st, kv);
        if (!bad.empty()) throw py::value_error(bad);
        auto* hp = static_cast<float*>(h.mutable_data());
        auto* mp = static_cast<float*>(mlp.mutable_data());
        const auto act = static_cast<genfuse::Act>(act_bits);
        without_gil([&] {
            genfuse::cpu_layers_forward(dims_, layers_, first, last, st, kv, hp, mp, mlp_in, threads, path, act);
        });
    }

  private:
    // A 1-D float32 (n,) array, or None where `optional`.
    const float* vec(const py::dict& d, const std::string& p, const char* key, int64_t n, bool optional) {
        if (!d.contains(key) || d[key].is_none()) {
            if (optional) return nullptr;
            throw py::value_error(p + key + " is missing");
        }
        py::array a = arg_array(d[key], p + key, 'f', 4, {n});
        keep_.append(a);
        return static_cast<const float*>(a.data());
    }

    // Dense float32 (N, K), or a list of (uint8 blocks (rows, K / 32 * block bytes), GGML type)
    // whose rows add up to N.
    genfuse::CpuWeight weight(const py::dict& d, const std::string& p, const char* key, int64_t N, int64_t K) {
        const std::string name = p + key;
        if (!d.contains(key)) throw py::value_error(name + " is missing");
        py::object w = d[key];
        genfuse::CpuWeight out;
        out.N = N;
        out.K = K;
        if (py::isinstance<py::array>(w)) {
            py::array a = arg_array(w, name, 'f', 4, {N, K});
            keep_.append(a);
            out.dense = static_cast<const float*>(a.data());
            return out;
        }
        if (!py::isinstance<py::list>(w) || py::len(w) == 0)
            throw py::type_error(name + " must be a float32 array or a non-empty list of (blocks, type) pairs");
        int64_t rows = 0;
        for (const py::handle part : py::reinterpret_borrow<py::list>(w)) {
            if (!py::isinstance<py::tuple>(part) || py::len(part) != 2)
                throw py::type_error(name + " parts must be (blocks, type) pairs");
            const auto t = py::reinterpret_borrow<py::tuple>(part);
            const int type = static_cast<int>(genfuse::pyargs::as_int64(t[1], (name + " type").c_str()));
            const int64_t bb = genfuse::block_bytes(type);
            if (bb == 0) throw py::value_error(name + ": unknown quant type " + std::to_string(type));
            const int64_t per_block = genfuse::block_weights(type);  // 256 for the K-quants, else 32
            if (K % per_block)
                throw py::value_error(name + ": type " + std::to_string(type) + " needs K a multiple of " +
                                      std::to_string(per_block) + ", got " + std::to_string(K));
            py::array a = arg_array(t[0], name + " blocks", 'u', 1, {-1, K / per_block * bb});
            keep_.append(a);
            out.parts.push_back({static_cast<const uint8_t*>(a.data()), a.shape(0), static_cast<genfuse::QType>(type)});
            rows += a.shape(0);
        }
        if (rows != N)
            throw py::value_error(name + " parts hold " + std::to_string(rows) + " rows, need " + std::to_string(N));
        return out;
    }

    genfuse::CpuDims dims_{};
    std::vector<genfuse::CpuLayer> layers_;
    py::list keep_;  // the arrays the raw pointers point into
};

}  // namespace

void register_cpu_layer(py::module_& m) {
    py::class_<CpuDecoder>(m, "CpuDecoder",
                           "A Llama-family model's decoder layers for the fused CPU step (csrc/cpu_layer.h).")
        .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, const py::list&>(), py::arg("hidden"),
             py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("intermediate"),
             py::arg("eps"), py::arg("layers"),
             "layers: one dict a layer: input_norm, post_norm (hidden,) float32; qkv, o, gate_up, down: a float32 "
             "(N, K) array or a list of (uint8 GGML blocks, type) row parts; b_qkv, b_o, b_gate_up, b_down: "
             "(N,) float32 or None.")
        .def_property_readonly("num_layers", &CpuDecoder::num_layers)
        .def("forward", &CpuDecoder::forward, py::arg("h"), py::arg("mlp_out"), py::arg("positions"),
             py::arg("slot_mapping"), py::arg("block_table"), py::arg("seq_lens"), py::arg("query_start_loc"),
             py::arg("k_pool"), py::arg("v_pool"), py::arg("cos"), py::arg("sin"), py::arg("threads") = 1,
             py::arg("path") = py::none(), py::arg("act_bits") = 32, py::arg("first") = 0,
             py::arg("last") = py::none(), py::arg("mlp_in") = false,
             "Layers [first, last) over one engine step, in place: h, mlp_out (N, hidden) float32; positions, "
             "slot_mapping (N,), block_table (B, W), seq_lens (B,), query_start_loc (B + 1,) int32; k_pool, "
             "v_pool (layers, blocks, block_size, Hkv, D) float32 (or both float16); cos, sin (positions, "
             "rotary half) float32. "
             "mlp_in: the first layer starts with h += mlp_out. path: a qdot path name (None: cpu_path()).");
    m.def("cpu_layer_isa", [](const py::object& path_) {
        const genfuse::CpuPath path =
            path_.is_none() ? genfuse::default_cpu_path() : genfuse::parse_cpu_path(py::cast<std::string>(path_));
        return std::string(genfuse::layer_isa_name(genfuse::layer_isa(path)));
    }, py::arg("path") = py::none(), "The instruction set the fused layer's own kernels use on a qdot path.");
}
