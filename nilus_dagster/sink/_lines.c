/* Joining payloads into the lines of one Arrow JSON read (see lines.join_lines_python, which
 * this mirrors).
 *
 * The decoder's happy path reads a batch as newline-separated JSON, which is only safe to map
 * back row by row when every payload is one non-empty line starting with '{'. Checked on the
 * joined bytes in Python, that took two full `count` passes (one of them for a two-byte
 * pattern) on top of the join: about 65 ms of every 200k orders, all of it holding the GIL
 * the pull needs. Here each payload is scanned in place (two memchr and an ASCII test) and
 * copied once.
 *
 * join_lines(payloads) returns (joined, longest, ascii), or None when a payload is empty, does
 * not start with '{', or holds a line feed or a carriage return; `ascii` is whether no byte of
 * the joined text has its high bit set.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static int all_ascii(const unsigned char *data, Py_ssize_t size) {
    unsigned char seen = 0;
    for (Py_ssize_t i = 0; i < size; i++) seen |= data[i];
    return seen < 0x80;
}

static PyObject *join_lines(PyObject *module, PyObject *payloads) {
    if (!PyList_Check(payloads)) {
        PyErr_SetString(PyExc_TypeError, "payloads must be a list of bytes");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(payloads), total = 0, longest = 0;
    int ascii = 1;
    if (count == 0) Py_RETURN_NONE;
    /* Exactly bytes, all of them before any content check: anything else (a subclass with its
     * own length or buffer, another bytes-like type) is a TypeError the caller answers with
     * the Python join, which then behaves as it always did. */
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!PyBytes_CheckExact(PyList_GET_ITEM(payloads, i))) {
            PyErr_SetString(PyExc_TypeError, "payloads must be a list of bytes");
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(payloads, i);
        const char *text = PyBytes_AS_STRING(item);
        Py_ssize_t size = PyBytes_GET_SIZE(item);
        if (size == 0 || text[0] != '{') Py_RETURN_NONE;
        if (memchr(text, '\n', size) != NULL || memchr(text, '\r', size) != NULL) {
            Py_RETURN_NONE;
        }
        if (ascii) ascii = all_ascii((const unsigned char *)text, size);
        if (size > longest) longest = size;
        if (total > PY_SSIZE_T_MAX - size - 1) return PyErr_NoMemory();
        total += size + 1;
    }
    PyObject *joined = PyBytes_FromStringAndSize(NULL, total - 1);
    if (joined == NULL) return NULL;
    char *out = PyBytes_AS_STRING(joined);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyList_GET_ITEM(payloads, i);
        Py_ssize_t size = PyBytes_GET_SIZE(item);
        if (i > 0) *out++ = '\n';
        memcpy(out, PyBytes_AS_STRING(item), size);
        out += size;
    }
    return Py_BuildValue("(NnO)", joined, longest, ascii ? Py_True : Py_False);
}

static PyMethodDef lines_methods[] = {
    {"join_lines", join_lines, METH_O,
     "join_lines(payloads) -> (joined, longest, ascii) or None: the payloads as JSON lines,"
     " when each is one line starting with '{'."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef lines_module = {
    PyModuleDef_HEAD_INIT, "_lines", "Joining payloads into JSON lines.", -1, lines_methods,
};

PyMODINIT_FUNC PyInit__lines(void) { return PyModule_Create(&lines_module); }
