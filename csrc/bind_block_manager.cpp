// Python bindings of genfuse::BlockManager as genfuse._C.BlockManager. The API, its rules and
// its exceptions are PyBlockManager's (runtime/block_manager.py).
//
// Arguments are converted by pyargs.h (the twin's accepted types, a fast loop over plain ints,
// memory-safe against an __index__ that changes the list). The rule, as in the twin: an integer
// is anything operator.index() accepts that fits in int64 (TypeError otherwise); a list of
// integers is a list, tuple, range or 1-D numpy array of them.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "block_manager.h"
#include "pyargs.h"

namespace py = pybind11;
using genfuse::BlockManager;

namespace {

using genfuse::pyargs::as_int64;
using genfuse::pyargs::as_int64s;
using genfuse::pyargs::Ids;
using genfuse::pyargs::type_name;

bool as_bool(const py::handle& h, const char* name) {
    if (!PyBool_Check(h.ptr())) throw py::type_error(std::string(name) + " must be a bool, not " + type_name(h.ptr()));
    return h.ptr() == Py_True;
}

// The (rows, cols) int32 array for block_table_array, and whether it comes zeroed. Small ones
// (the decode step's) are left uninitialised: the class writes every entry, tables and padding,
// in one pass. Big ones come from numpy.zeros, whose calloc leaves untouched pages unmapped, so
// a wide `width` costs address space rather than memory (or raises MemoryError) instead of
// getting the process killed for memory.
std::pair<py::array_t<int32_t>, bool> table_array(py::ssize_t rows, py::ssize_t cols) {
    constexpr py::ssize_t kSmall = py::ssize_t{1} << 20;  // elements: 4 MiB
    if (cols != 0 && rows > kSmall / cols) {
        py::object np = py::module_::import("numpy");
        return {np.attr("zeros")(py::make_tuple(rows, cols), np.attr("int32")).cast<py::array_t<int32_t>>(), true};
    }
    return {py::array_t<int32_t>({rows, cols}), false};
}

}  // namespace

void register_block_manager(py::module_& m) {
    py::register_local_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const genfuse::OutOfBlocks& e) {
            PyErr_SetString(PyExc_MemoryError, e.what());
        } catch (const genfuse::UnknownSequence& e) {
            py::int_ key(e.seq_id);
            PyErr_SetObject(PyExc_KeyError, key.ptr());
        }
    });

    using H = const py::handle&;
    py::class_<BlockManager>(m, "BlockManager",
        "Paged KV-cache block manager with prefix caching. The rules are those of\n"
        "genfuse.runtime.block_manager.PyBlockManager, its pure-Python twin and specification.")
        .def(py::init([](H num_blocks, H block_size, H caching, H hash_bits) {
                 return BlockManager(as_int64(num_blocks, "num_blocks"), as_int64(block_size, "block_size"),
                                     as_bool(caching, "enable_prefix_caching"), as_int64(hash_bits, "hash_bits"));
             }),
             py::arg("num_blocks"), py::arg("block_size"), py::arg("enable_prefix_caching") = true,
             py::kw_only(), py::arg("hash_bits") = 64)
        .def_property_readonly("num_blocks", &BlockManager::num_blocks)
        .def_property_readonly("block_size", &BlockManager::block_size)
        .def_property_readonly("enable_prefix_caching", &BlockManager::enable_prefix_caching)
        .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks,
                               "Blocks held by no live sequence, cached ones (evictable) included.")
        .def_property_readonly("num_cached_blocks", &BlockManager::num_cached_blocks,
                               "Blocks registered for prefix hits (live or free).")
        .def("allocate",
             [](BlockManager& bm, H seq_id, H token_ids) {
                 const int64_t id = as_int64(seq_id, "seq_id");
                 const Ids tokens = as_int64s(token_ids, "token_ids");
                 return bm.allocate(id, tokens.data(), static_cast<int64_t>(tokens.size()));
             },
             py::arg("seq_id"), py::arg("token_ids"),
             "Register a new sequence; return how many leading tokens were already cached.")
        .def("cached_prefix_length",
             [](const BlockManager& bm, H token_ids) {
                 const Ids tokens = as_int64s(token_ids, "token_ids");
                 return bm.cached_prefix_length(tokens.data(), static_cast<int64_t>(tokens.size()));
             },
             py::arg("token_ids"), "What allocate(token_ids) would find cached now (whole blocks); changes nothing.")
        .def("extend",
             [](BlockManager& bm, H seq_id, H token_ids) {
                 const int64_t id = as_int64(seq_id, "seq_id");
                 const Ids tokens = as_int64s(token_ids, "token_ids");
                 std::vector<genfuse::CopyPair> cows;
                 bm.extend(id, tokens.data(), static_cast<int64_t>(tokens.size()), cows);
                 py::list out(cows.size());
                 for (size_t i = 0; i < cows.size(); ++i) out[i] = py::make_tuple(cows[i].first, cows[i].second);
                 return out;
             },
             py::arg("seq_id"), py::arg("token_ids"),
             "append() of each token in order, all or nothing; return the copy-on-write pairs.")
        .def("append",
             [](BlockManager& bm, H seq_id, H token_id) {
                 const int64_t id = as_int64(seq_id, "seq_id");
                 return bm.append(id, as_int64(token_id, "token_id"));
             },
             py::arg("seq_id"), py::arg("token_id"),
             "Add one token; return (src, dst) when the engine must copy a block first, else None.")
        .def("append_batch",
             [](BlockManager& bm, H seq_ids, H token_ids) {
                 const Ids ids = as_int64s(seq_ids, "seq_ids");
                 const Ids tokens = as_int64s(token_ids, "token_ids");
                 if (ids.size() != tokens.size())
                     throw std::invalid_argument(std::to_string(ids.size()) + " seq_ids but " +
                                                 std::to_string(tokens.size()) + " token_ids");
                 std::vector<genfuse::CopyPair> cows;
                 bm.append_batch(ids.data(), tokens.data(), static_cast<int64_t>(ids.size()), cows);
                 py::list out(cows.size());
                 for (size_t i = 0; i < cows.size(); ++i) out[i] = py::make_tuple(cows[i].first, cows[i].second);
                 return out;
             },
             py::arg("seq_ids"), py::arg("token_ids"),
             "append() for each pair in order, all or nothing; return the copy-on-write pairs.")
        .def("fork",
             [](BlockManager& bm, H src_id, H dst_id) {
                 const int64_t src = as_int64(src_id, "src_id");
                 bm.fork(src, as_int64(dst_id, "dst_id"));
             },
             py::arg("src_id"), py::arg("dst_id"), "dst_id becomes a new sequence sharing all of src_id's blocks.")
        .def("free", [](BlockManager& bm, H seq_id) { bm.free(as_int64(seq_id, "seq_id")); },
             py::arg("seq_id"), "End a sequence: its unreferenced blocks join the free queue, tail first.")
        .def("block_table", [](const BlockManager& bm, H seq_id) { return bm.block_table(as_int64(seq_id, "seq_id")); },
             py::arg("seq_id"))
        .def("num_tokens", [](const BlockManager& bm, H seq_id) { return bm.num_tokens(as_int64(seq_id, "seq_id")); },
             py::arg("seq_id"))
        .def("block_hash", [](const BlockManager& bm, H block_id) { return bm.block_hash(as_int64(block_id, "block_id")); },
             py::arg("block_id"),
             "The chained hash of the content a block bears (None for a partial or unused block).")
        .def("block_table_array",
             [](const BlockManager& bm, H seq_ids, H width_) {
                 const Ids ids = as_int64s(seq_ids, "seq_ids");
                 const int64_t width = as_int64(width_, "width");
                 if (width < 0 || width > bm.num_blocks())  // before sizing the array with it
                     throw std::invalid_argument("width=" + std::to_string(width) +
                                                 " is outside [0, num_blocks=" +
                                                 std::to_string(bm.num_blocks()) + "]");
                 auto [out, zeroed] = table_array(static_cast<py::ssize_t>(ids.size()), width);
                 bm.block_table_array(ids.data(), static_cast<int64_t>(ids.size()), width, out.mutable_data(),
                                      zeroed);
                 return out;
             },
             py::arg("seq_ids"), py::arg("width"),
             "The block tables as int32 (len(seq_ids), width), padded with 0.")
        .def("slot_mapping",
             [](const BlockManager& bm, H seq_ids) {
                 const Ids ids = as_int64s(seq_ids, "seq_ids");
                 py::array_t<int32_t> out(static_cast<py::ssize_t>(ids.size()));
                 bm.slot_mapping(ids.data(), static_cast<int64_t>(ids.size()), out.mutable_data());
                 return out;
             },
             py::arg("seq_ids"), "int32 (len(seq_ids),): the cache slot of each sequence's last token.");
}
