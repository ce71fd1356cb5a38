// Python bindings of the quantized CPU matmuls: genfuse._C.qdot_matmul (the integer-dot one the
// runtime uses, qdot.h) with quantize_q8 / cpu_path / cpu_paths, and genfuse._C.quant_matmul (float
// decoding, quant_matmul.h) with dequantize_rows. They take numpy arrays (a CPU torch tensor's .numpy() is a
// zero-copy view), check every shape, dtype and layout before touching memory, and release the
// GIL while they compute.
//
// The arrays must be numpy arrays, not anything numpy could convert: numpy's conversion of a
// nested list runs the items' Python code while it walks the list and crashes when that code
// mutates it, and an output converted from a list would be written to a temporary and lost.
// All Python code an argument can run (the row indices' __index__) runs before the arrays are
// checked, so no array can be resized between its check and its use.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include <unistd.h>

#include "gemm.h"
#include "kquant.h"
#include "pyargs.h"
#include "qdot.h"
#include "quant_matmul.h"

namespace py = pybind11;

namespace {

using genfuse::pyargs::shape_of;

// An argument that must be a numpy array (TypeError otherwise; no conversion).
py::array ndarray(const py::handle& h, const char* name) {
    if (!py::isinstance<py::array>(h))
        throw py::type_error(std::string(name) + " must be a numpy.ndarray, not " + genfuse::pyargs::type_name(h.ptr()));
    return py::reinterpret_borrow<py::array>(h);
}

bool c_contiguous(const py::array& a) { return (a.flags() & py::array::c_style) != 0; }

void check_2d(const py::array& a, const char* name, char kind, int itemsize, bool writable) {
    if (a.ndim() != 2)
        throw py::value_error(std::string(name) + " must be 2-D, got shape " + shape_of(a));
    if (a.dtype().kind() != kind || a.itemsize() != itemsize || a.dtype().byteorder() == '>')
        throw py::type_error(std::string(name) + (kind == 'f' ? " must be float32 (native byte order)" : " must be uint8") +
                             ", got " + std::string(py::str(a.dtype())));
    if (!c_contiguous(a)) throw py::value_error(std::string(name) + " must be C-contiguous");
    if (writable && !a.writeable()) throw py::value_error(std::string(name) + " must be writable");
}

// Whether two C-contiguous arrays share a byte.
bool overlap(const py::array& a, const py::array& b) {
    const auto* pa = static_cast<const char*>(a.data());
    const auto* pb = static_cast<const char*>(b.data());
    return a.nbytes() > 0 && b.nbytes() > 0 && pa < pb + b.nbytes() && pb < pa + a.nbytes();
}

// (N, row bytes) of a packed weight of K columns in format `type`; ValueError otherwise.
int64_t check_weight(const py::array& w, int type, int64_t K) {
    const int64_t bb = genfuse::block_bytes(type), bw = genfuse::block_weights(type);
    if (bb == 0)
        throw py::value_error("unknown quant type " + std::to_string(type) +
                              " (Q4_0=2, Q4_1=3, Q8_0=8, Q4_K=12, Q5_K=13, Q6_K=14)");
    if (K <= 0 || K % bw)
        throw py::value_error("K must be a positive multiple of " + std::to_string(bw) +
                              (bw == genfuse::kQBlock ? "" : " (a K-quant block)") + ", got " + std::to_string(K));
    check_2d(w, "w", 'u', 1, false);
    if (w.shape(1) != K / bw * bb)
        throw py::value_error("w has " + std::to_string(w.shape(1)) + " bytes a row; K=" + std::to_string(K) +
                              " in this format needs " + std::to_string(K / bw * bb));
    return w.shape(0);
}

// Runs f without the GIL. A daemon thread still computing when Python shuts down must not take
// the GIL back: CPython would end it with pthread_exit, whose unwinding out of
// gil_scoped_release's noexcept destructor aborts the process ("terminate called without an
// active exception"). It is parked instead, as CPython 3.14 parks such threads itself, until the
// process exits.
template <class F>
void without_gil(F&& f) {
    py::gil_scoped_release nogil;
    f();
    if (_Py_IsFinalizing()) {
        nogil.disarm();
        for (;;) pause();
    }
}

genfuse::Act activation(int bits) {
    if (bits != 8 && bits != 16 && bits != 32)
        throw py::value_error("act_bits must be 8, 16 or 32, got " + std::to_string(bits));
    return static_cast<genfuse::Act>(bits);
}

// A matmul's checked arguments: x (M, K) float32, w (N, ...) packed in `type` (or, with
// dense_ok and type 0, GGML's F32: float32 (N, K)), y (M, N) float32 writable, sharing no memory
// with x or w.
struct MatmulArgs {
    py::array x, w, y;
    int64_t M, K, N;
};

MatmulArgs matmul_args(const py::handle& x_, const py::handle& w_, int type, const py::handle& y_, bool dense_ok) {
    MatmulArgs a{ndarray(x_, "x"), ndarray(w_, "w"), ndarray(y_, "y"), 0, 0, 0};
    check_2d(a.x, "x", 'f', 4, false);
    a.M = a.x.shape(0), a.K = a.x.shape(1);
    if (dense_ok && type == 0) {
        check_2d(a.w, "w", 'f', 4, false);
        if (a.w.shape(1) != a.K)
            throw py::value_error("w must have K=" + std::to_string(a.K) + " columns, got shape " + shape_of(a.w));
        if (a.K <= 0) throw py::value_error("K must be positive, got " + std::to_string(a.K));
        a.N = a.w.shape(0);
    } else {
        a.N = check_weight(a.w, type, a.K);
    }
    check_2d(a.y, "y", 'f', 4, true);
    if (a.y.shape(0) != a.M || a.y.shape(1) != a.N)
        throw py::value_error("y must be (" + std::to_string(a.M) + ", " + std::to_string(a.N) + "), got " + shape_of(a.y));
    if (overlap(a.y, a.x) || overlap(a.y, a.w)) throw py::value_error("y must not share memory with x or w");
    return a;
}

// The code path called `path_` (None: the default), ValueError if this CPU lacks it.
genfuse::CpuPath cpu_path_arg(const py::object& path_) {
    const genfuse::CpuPath path =
        path_.is_none() ? genfuse::default_cpu_path() : genfuse::parse_cpu_path(py::cast<std::string>(path_));
    if (!genfuse::cpu_path_supported(path))
        throw py::value_error(std::string("CPU path ") + genfuse::cpu_path_name(path) + " is not supported by this CPU");
    return path;
}

}  // namespace

void register_quant_matmul(py::module_& m) {
    m.def("quant_matmul",
          [](const py::handle& x_, const py::handle& w_, int type, const py::handle& y_, int threads, bool portable) {
              MatmulArgs a = matmul_args(x_, w_, type, y_, false);
              const auto* xp = static_cast<const float*>(a.x.data());
              const auto* wp = static_cast<const uint8_t*>(a.w.data());
              auto* yp = static_cast<float*>(a.y.mutable_data());
              without_gil([&] {
                  genfuse::quant_matmul(xp, a.M, a.K, wp, a.N, static_cast<genfuse::QType>(type), yp, threads, portable);
              });
          },
          py::arg("x"), py::arg("w"), py::arg("type"), py::arg("y"), py::arg("threads") = 1, py::arg("portable") = false,
          "y (M, N) = x (M, K) @ dequantize(w).T for w (N, K/32 * block bytes) uint8 in GGML format "
          "`type` (2 Q4_0, 3 Q4_1, 8 Q8_0; 12 Q4_K, 13 Q5_K, 14 Q6_K go to the integer-dot kernel at "
          "act_bits 32); x and y float32 numpy arrays, C-contiguous. portable=True skips the SIMD code (for tests).");
    m.def("float_to_half",
          [](const py::array_t<float, py::array::c_style | py::array::forcecast>& x) {
              py::array_t<uint16_t> out(x.size());
              const float* xp = x.data();
              uint16_t* op = out.mutable_data();
              for (py::ssize_t i = 0; i < x.size(); ++i) op[i] = genfuse::float_to_half(xp[i]);
              return out;
          },
          py::arg("x"),
          "The IEEE half bits (uint16, flat) of float32 values, rounded to nearest even as the fused CPU layers "
          "store a float16 KV cache on the portable path (for tests; F16C's conversion on the others).");
    m.def("dequantize_rows",
          [](const py::handle& w_, int type, int64_t K, const py::handle& rows, const py::handle& out_, int threads) {
              // The row indices first, copied: their conversion is the only Python code an
              // argument runs, and another thread cannot change the copy once it is checked.
              std::vector<int64_t> idx;
              const bool all_rows = rows.is_none();
              if (!all_rows) {
                  if (py::isinstance<py::array>(rows)) {
                      const auto given = py::reinterpret_borrow<py::array>(rows);
                      if (given.ndim() != 1 || (given.size() > 0 && given.dtype().kind() != 'i' && given.dtype().kind() != 'u'))
                          throw py::value_error("rows must be a 1-D array of integer row indices, got " +
                                                shape_of(given) + " " + std::string(py::str(given.dtype())));
                      // An integer array's cast runs no Python code.
                      const auto cast = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(given);
                      if (!cast) throw py::error_already_set();
                      idx.assign(cast.data(), cast.data() + cast.size());
                  } else if (PyList_Check(rows.ptr()) || PyTuple_Check(rows.ptr()) || PyRange_Check(rows.ptr())) {
                      idx = genfuse::pyargs::as_int64s(rows, "rows");
                  } else {
                      throw py::type_error("rows must be None, a 1-D integer numpy array or a list of ints, not " +
                                           genfuse::pyargs::type_name(rows.ptr()));
                  }
              }
              const py::array w = ndarray(w_, "w");
              py::array out = ndarray(out_, "out");
              const int64_t N = check_weight(w, type, K);
              check_2d(out, "out", 'f', 4, true);
              const int64_t count = all_rows ? N : static_cast<int64_t>(idx.size());
              for (int64_t i = 0; i < static_cast<int64_t>(idx.size()); ++i)
                  if (idx[i] < 0 || idx[i] >= N)
                      throw py::index_error("rows[" + std::to_string(i) + "]=" + std::to_string(idx[i]) +
                                            " is out of range [0, " + std::to_string(N) + ")");
              if (out.shape(0) != count || out.shape(1) != K)
                  throw py::value_error("out must be (" + std::to_string(count) + ", " + std::to_string(K) +
                                        "), got " + shape_of(out));
              if (overlap(out, w)) throw py::value_error("out must not share memory with w");
              if (!all_rows && count == 0) return;  // (a null rp would mean every row)
              const int64_t* rp = all_rows ? nullptr : idx.data();
              const auto* wp = static_cast<const uint8_t*>(w.data());
              auto* op = static_cast<float*>(out.mutable_data());
              without_gil([&] { genfuse::dequantize_rows(wp, N, K, static_cast<genfuse::QType>(type), rp, count, op, threads); });
          },
          py::arg("w"), py::arg("type"), py::arg("K"), py::arg("rows"), py::arg("out"), py::arg("threads") = 1,
          "out = the float32 rows `rows` (None: all; a 1-D integer array or a list of ints) of the "
          "GGML-format numpy array w, exactly as gguf.quants dequantizes them.");
    m.def("qdot_matmul",
          [](const py::handle& x_, const py::handle& w_, int type, const py::handle& y_, int threads, const py::object& path_,
             int act_bits) {
              // The path first: it is the only argument that runs Python code (str conversion).
              const genfuse::CpuPath path = cpu_path_arg(path_);
              const genfuse::Act act = activation(act_bits);
              MatmulArgs a = matmul_args(x_, w_, type, y_, false);
              const auto* xp = static_cast<const float*>(a.x.data());
              const auto* wp = static_cast<const uint8_t*>(a.w.data());
              auto* yp = static_cast<float*>(a.y.mutable_data());
              without_gil([&] {
                  genfuse::qdot_matmul(xp, a.M, a.K, wp, a.N, static_cast<genfuse::QType>(type), yp, threads, path, act);
              });
          },
          py::arg("x"), py::arg("w"), py::arg("type"), py::arg("y"), py::arg("threads") = 1, py::arg("path") = py::none(),
          py::arg("act_bits") = 32,
          "y (M, N) = quantize_activations(x, act_bits) (M, K) @ dequantize(w).T with exact integer block dots: "
          "w (N, K/block * block bytes) uint8 in GGML format `type` (2 Q4_0, 3 Q4_1, 8 Q8_0, 12 Q4_K, 13 Q5_K, "
          "14 Q6_K; blocks of 32, 256 for the K-quants), x and y float32 "
          "C-contiguous numpy arrays. path: a name from cpu_paths() (None: cpu_path()); act_bits 32, 16 or 8.");
    m.attr("QDOT_MAX_ROWS") = genfuse::kQdotMaxRows;  // where the runtime leaves qdot for gemm
    m.def("gemm_matmul",
          [](const py::handle& x_, const py::handle& w_, int type, const py::handle& y_, int threads, const py::object& path_) {
              const genfuse::CpuPath path = cpu_path_arg(path_);  // first: it runs Python code
              MatmulArgs a = matmul_args(x_, w_, type, y_, true);
              genfuse::GemmWeight gw;
              if (type == 0) gw.dense = static_cast<const float*>(a.w.data());
              else gw.blocks = static_cast<const uint8_t*>(a.w.data()), gw.type = static_cast<genfuse::QType>(type);
              const auto* xp = static_cast<const float*>(a.x.data());
              auto* yp = static_cast<float*>(a.y.mutable_data());
              without_gil([&] { genfuse::gemm_matmul(xp, a.M, a.K, gw, a.N, yp, a.N, threads, path); });
          },
          py::arg("x"), py::arg("w"), py::arg("type"), py::arg("y"), py::arg("threads") = 1, py::arg("path") = py::none(),
          "y (M, N) = x (M, K) @ dequantize(w).T in float32 (activations not quantized; gemm.h): the matmul for "
          "many rows of x. w as for qdot_matmul, or type 0 (F32) and w float32 (N, K). path: a name from "
          "cpu_paths() (None: cpu_path()), which sets the vector width.");
    m.def("quantize_activations",
          [](const py::handle& x_, int act_bits, int block) {
              const genfuse::Act act = activation(act_bits);
              if (block != genfuse::kQBlock && block != genfuse::kKBlock)
                  throw py::value_error("block must be 32 (qdot's blocks) or 256 (the K-quants'), got " + std::to_string(block));
              const py::array x = ndarray(x_, "x");
              check_2d(x, "x", 'f', 4, false);
              const int64_t M = x.shape(0), K = x.shape(1);
              if (K <= 0 || K % block)
                  throw py::value_error("K must be a positive multiple of " + std::to_string(block) + ", got " + std::to_string(K));
              py::array q = act == genfuse::Act::Q8    ? py::array(py::array_t<int8_t>({M, K}))
                            : act == genfuse::Act::Q16 ? py::array(py::array_t<int16_t>({M, K}))
                                                       : py::array(py::array_t<int16_t>({M, 2 * K}));
              py::array_t<float> d({M, K / block}), s({M, K / genfuse::kQBlock});
              const auto* xp = static_cast<const float*>(x.data());
              if (block == genfuse::kKBlock)
                  genfuse::quantize_act_k(xp, M, K, act, q.mutable_data(), d.mutable_data(), s.mutable_data());
              else
                  genfuse::quantize_act(xp, M, K, act, q.mutable_data(), d.mutable_data(), s.mutable_data());
              return py::make_tuple(q, d, s);
          },
          py::arg("x"), py::arg("act_bits") = 32, py::arg("block") = 32,
          "(q, d float32 (M, K/32), s float32 (M, K/32)): the blocks qdot_matmul makes of x (M, K) float32: "
          "d = max|x| / Q per block of 32 (Q = 32767, or 127 for act_bits=8), q = round(x / d) half to even "
          "(int16 (M, K), int8 for 8; for 32, int16 (M, 2K): per block 32 high parts then 32 low parts, "
          "x / d = high + low / 2^16), s = d * sum(q). block=256: one d per 256 values (qdot_matmul's blocks for "
          "the K-quants, kquant.h), d (M, K/256), s still per 32.");
    m.def("cpu_path", []() { return std::string(genfuse::cpu_path_name(genfuse::default_cpu_path())); },
          "The code path qdot_matmul uses by default: GENFUSE_CPU_PATH if set, else the best of cpu_paths().");
    m.def("cpu_paths", []() {
              py::list out;
              for (auto p : genfuse::supported_cpu_paths()) out.append(genfuse::cpu_path_name(p));
              return out;
          },
          "The qdot_matmul code paths this CPU runs, best first.");
    m.def("quant_matmul_uses_avx", &genfuse::quant_matmul_uses_avx,
          "Whether quant_matmul runs its AVX/FMA/F16C code on this CPU (else portable C++).");
}
