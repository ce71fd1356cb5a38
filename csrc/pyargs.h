// Conversion of integer and list-of-integer arguments for the bindings, by hand rather than
// through pybind11's casters: the accepted types stay exactly the Python twin's whatever the
// pybind11 version, and a list of plain ints converts in a tight loop (the decode step's path).
//
// Memory safety: converting an item that is not an int calls its __index__, arbitrary Python
// code that may clear, grow or refill the list being converted and drop the last reference to
// its items. A conversion therefore never keeps a pointer into a list's item array across
// Python code: plain ints are read with no Python code running, and from the first item that
// is not one, the remaining items are converted from a snapshot holding a reference to each.
// The result is the list as it was when the call began.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace genfuse::pyargs {

namespace py = pybind11;
using Ids = std::vector<int64_t>;

inline std::string type_name(PyObject* o) { return Py_TYPE(o)->tp_name; }

// "token_ids[3]" for an item, "seq_id" for a scalar argument (i < 0).
inline std::string arg_name(const char* name, Py_ssize_t i) {
    return i < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(i) + "]";
}

// Raise `type` with `msg`, the exception being handled (`err`) as its __cause__.
[[noreturn]] inline void raise_from(py::error_already_set& err, PyObject* type, const std::string& msg) {
    py::raise_from(err, type, msg.c_str());
    throw py::error_already_set();
}

// "=<digits>" for an int, or its size when printing it would be costly (10**100000). Error
// path only. int.bit_length and PyNumber_ToBase, not the object's own methods: an int subclass
// may override them.
inline std::string int_text(PyObject* o) {
    py::object keep = py::reinterpret_borrow<py::object>(o);
    py::object bits = py::handle(reinterpret_cast<PyObject*>(&PyLong_Type)).attr("bit_length")(keep);
    const auto nbits = bits.cast<long long>();
    if (nbits > 256) return " (an int of " + std::to_string(nbits) + " bits)";
    py::object s = py::reinterpret_steal<py::object>(PyNumber_ToBase(o, 10));
    if (!s) throw py::error_already_set();
    return "=" + s.cast<std::string>();
}

// Out of line and cold, so that the per-item loops stay small.
[[noreturn, gnu::noinline, gnu::cold]] inline void throw_int64_overflow(PyObject* o, const char* name, Py_ssize_t i) {
    throw py::type_error(arg_name(name, i) + int_text(o) +
                         " does not fit in int64 [-9223372036854775808, 9223372036854775807]");
}

// The value of an int (PyLong_Check(o)) within int64, else TypeError. Runs no Python code
// unless it fails.
inline int64_t long_to_int64(PyObject* o, const char* name, Py_ssize_t i) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow) throw_int64_overflow(o, name, i);
    if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
    return v;
}

// operator.index(o) as an int64, else TypeError naming the argument (floats, strs, None, ints
// beyond int64, an __index__ that raises or returns a non-int). KeyboardInterrupt, MemoryError
// and other non-Exception errors raised by __index__ pass through unchanged.
inline int64_t as_int64(PyObject* o, const char* name, Py_ssize_t i = -1) {
    if (PyLong_Check(o)) return long_to_int64(o, name, i);
    py::object keep = py::reinterpret_borrow<py::object>(o);  // __index__ may drop all other references
    PyNumberMethods* nb = Py_TYPE(o)->tp_as_number;
    const bool has_index = nb && nb->nb_index;
    py::object idx = py::reinterpret_steal<py::object>(PyNumber_Index(o));
    if (!idx) {
        if (!PyErr_ExceptionMatches(PyExc_Exception) || PyErr_ExceptionMatches(PyExc_MemoryError))
            throw py::error_already_set();
        py::error_already_set err;
        if (!has_index) raise_from(err, PyExc_TypeError, arg_name(name, i) + " must be an int, not " + type_name(o));
        std::string why = py::str(err.type().attr("__name__")).cast<std::string>();
        try {
            const std::string text = py::str(err.value()).cast<std::string>();
            if (!text.empty()) why += ": " + (text.size() > 200 ? text.substr(0, 200) + "..." : text);
        } catch (const py::error_already_set&) {  // an exception whose str() fails: its type will do
        }
        raise_from(err, PyExc_TypeError, arg_name(name, i) + ": operator.index() of a " + type_name(o) + " raised " + why);
    }
    return long_to_int64(idx.ptr(), name, i);
}

inline int64_t as_int64(const py::handle& h, const char* name) { return as_int64(h.ptr(), name); }

// Strong references to a sequence's items, released when it goes out of scope.
class Snapshot {
  public:
    Snapshot() = default;
    Snapshot(const Snapshot&) = delete;
    Snapshot& operator=(const Snapshot&) = delete;
    ~Snapshot() {
        for (PyObject* o : refs_) Py_DECREF(o);
    }
    void reserve(size_t n) { refs_.reserve(n); }
    void push_borrowed(PyObject* o) {  // reserve() first: push_back must not throw between the two
        Py_INCREF(o);
        refs_.push_back(o);
    }
    void push_new(PyObject* o) { refs_.push_back(o); }
    size_t size() const { return refs_.size(); }
    PyObject* operator[](size_t i) const { return refs_[i]; }

  private:
    std::vector<PyObject*> refs_;
};

// A list, tuple, range or 1-D numpy array of int64, else TypeError naming the argument (and
// the item: "token_ids[3] must be an int, not float").
inline Ids as_int64s(const py::handle& h, const char* name) {
    PyObject* o = h.ptr();
    Ids out;
    if (PyList_Check(o)) {
        const Py_ssize_t n = PyList_GET_SIZE(o);
        out.resize(static_cast<size_t>(n));  // a C++ allocation: no Python code, the list stays as it is
        PyObject** items = PySequence_Fast_ITEMS(o);
        Py_ssize_t i = 0;
        for (; i < n && PyLong_Check(items[i]); ++i) out[i] = long_to_int64(items[i], name, i);
        if (i == n) return out;
        // From here on __index__ runs: hold every remaining item first. No Python code has run
        // since n and items were read, so this is the list as the caller passed it.
        Snapshot rest;
        rest.reserve(static_cast<size_t>(n - i));
        for (Py_ssize_t j = i; j < n; ++j) rest.push_borrowed(items[j]);
        for (Py_ssize_t j = i; j < n; ++j) out[j] = as_int64(rest[static_cast<size_t>(j - i)], name, j);
        return out;
    }
    if (PyTuple_Check(o)) {  // immutable, and the caller's arguments hold it: its items stay alive
        const Py_ssize_t n = PyTuple_GET_SIZE(o);
        out.resize(static_cast<size_t>(n));
        for (Py_ssize_t i = 0; i < n; ++i) out[i] = as_int64(PyTuple_GET_ITEM(o, i), name, i);
        return out;
    }
    const bool is_array = py::isinstance<py::array>(h);
    if (is_array) {
        auto a = py::reinterpret_borrow<py::array>(h);
        if (a.ndim() != 1)
            throw py::type_error(std::string(name) + " must be 1-D, not a " + std::to_string(a.ndim()) +
                                 "-D array");
        const auto n = static_cast<size_t>(a.shape(0));
        const auto stride = a.strides(0);
        const char* p = static_cast<const char*>(a.data());
        // Native int32/int64 (the engine's arrays): read in place, no Python code runs.
        if (a.dtype().equal(py::dtype::of<int64_t>()) || a.dtype().equal(py::dtype::of<int32_t>())) {
            const bool wide = a.itemsize() == 8;
            out.resize(n);
            for (size_t i = 0; i < n; ++i, p += stride) {
                if (wide) { int64_t v; std::memcpy(&v, p, 8); out[i] = v; }
                else { int32_t v; std::memcpy(&v, p, 4); out[i] = v; }
            }
            return out;
        }
    } else if (!PyRange_Check(o)) {
        throw py::type_error(std::string(name) + " must be a list, tuple, range or 1-D array of ints, not " +
                             type_name(o));
    }
    const Py_ssize_t n = PySequence_Size(o);  // other dtypes and ranges: item by item
    if (n < 0) throw py::error_already_set();
    out.resize(static_cast<size_t>(n));
    if (!is_array) {  // a range's items are fresh ints: nothing can change it
        for (Py_ssize_t i = 0; i < n; ++i) {
            py::object item = py::reinterpret_steal<py::object>(PySequence_GetItem(o, i));
            if (!item) throw py::error_already_set();
            out[i] = long_to_int64(item.ptr(), name, i);
        }
        return out;
    }
    // Other dtypes: an object array's items may have an __index__ that resizes or refills the
    // array, so all of them are taken before any is converted.
    Snapshot items;
    items.reserve(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* item = PySequence_GetItem(o, i);
        if (!item) throw py::error_already_set();
        items.push_new(item);
    }
    for (Py_ssize_t i = 0; i < n; ++i) out[i] = as_int64(items[static_cast<size_t>(i)], name, i);
    return out;
}

// "(2, 3)", "(5,)": a shape as Python prints it, for error messages.
inline std::string dims(const std::vector<int64_t>& d) {
    std::string s = "(";
    for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
    return s + (d.size() == 1 ? ",)" : ")");
}

inline std::string shape_of(const py::array& a) {
    return dims(std::vector<int64_t>(a.shape(), a.shape() + a.ndim()));
}

}  // namespace genfuse::pyargs
