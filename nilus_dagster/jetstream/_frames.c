/* The bulk read of plain MSG frames (see bulk.read_bulk_python, which this mirrors).
 *
 * A busy pull inbox receives runs of `MSG <subject> <sid> <reply> <size>\r\n<payload>\r\n`.
 * Read in Python, each frame costs a dozen short-lived objects (the pieces of a split, the
 * tokens of its control line); here a frame costs only what the inbox keeps: its reply and
 * payload, and its subject when it differs from the frame before. A profile put a third of
 * the pull's main thread in the Python read.
 *
 * bulk_frames(data, pos) reads frames from `pos` on while each is a plain MSG of the first
 * frame's sid whose payload and trailing CRLF are all in `data`, and returns
 * (end, sid, subjects, replies, payloads, frames, payload_bytes), or None when the first frame
 * is not such a frame. The caller reads whatever stopped it (another operation, another sid,
 * a frame cut by the end of the read) with its own, complete parser. Being stricter than that
 * parser (digits only in numbers, single spaces) only ever hands more to it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* Longest number accepted: far above any sid or payload size, far below overflow. */
#define MAX_DIGITS 15

static int parse_count(const char *text, Py_ssize_t length, Py_ssize_t *value) {
    if (length <= 0 || length > MAX_DIGITS) return -1;
    Py_ssize_t result = 0;
    for (Py_ssize_t i = 0; i < length; i++) {
        if (text[i] < '0' || text[i] > '9') return -1;
        result = result * 10 + (text[i] - '0');
    }
    *value = result;
    return 0;
}

/* The CRLF that ends the line starting at `line`, or NULL if `end` comes first. */
static const char *line_end(const char *line, const char *end) {
    const char *cr = memchr(line, '\r', end - line);
    while (cr != NULL && (cr + 1 >= end || cr[1] != '\n')) {
        cr = memchr(cr + 1, '\r', end - cr - 1);
    }
    return cr;
}

/* Splits the arguments of a MSG line at single spaces: exactly subject, sid, reply, size. */
static int msg_arguments(const char *args, const char *eol, const char **token,
                         Py_ssize_t *length) {
    int count = 0;
    const char *start = args;
    for (;;) {
        const char *space = memchr(start, ' ', eol - start);
        const char *stop = space != NULL ? space : eol;
        if (stop == start || count == 4) return -1;
        token[count] = start;
        length[count] = stop - start;
        count++;
        if (space == NULL) break;
        start = space + 1;
    }
    return count == 4 ? 0 : -1;
}

static int append_bytes(PyObject *list, const char *data, Py_ssize_t size) {
    PyObject *item = PyBytes_FromStringAndSize(data, size);
    if (item == NULL) return -1;
    int failed = PyList_Append(list, item);
    Py_DECREF(item);
    return failed;
}

static PyObject *bulk_frames(PyObject *module, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos;
    if (!PyArg_ParseTuple(args, "y*n", &view, &pos)) return NULL;
    const char *data = view.buf;
    const char *end = data + view.len;
    Py_ssize_t frames = 0, payload_bytes = 0, first_sid = -1;
    PyObject *subjects = PyList_New(0), *replies = PyList_New(0), *payloads = PyList_New(0);
    PyObject *subject = NULL, *result = NULL;
    if (subjects == NULL || replies == NULL || payloads == NULL) goto done;
    if (pos < 0 || pos > view.len) {
        PyErr_SetString(PyExc_ValueError, "pos is outside data");
        goto done;
    }
    const char *at = data + pos;
    while (end - at > 4 && memcmp(at, "MSG ", 4) == 0) {
        const char *eol = line_end(at, end);
        if (eol == NULL) break;
        const char *token[4];
        Py_ssize_t length[4], sid, size;
        if (msg_arguments(at + 4, eol, token, length) != 0) break;
        if (parse_count(token[1], length[1], &sid) != 0) break;
        if (parse_count(token[3], length[3], &size) != 0) break;
        if (first_sid < 0) {
            first_sid = sid;
        } else if (sid != first_sid) {
            break;
        }
        const char *payload = eol + 2;
        if (end - payload < size + 2) break; /* cut by the end of the read */
        if (payload[size] != '\r' || payload[size + 1] != '\n') break;
        /* One subject object for a run of frames with the same subject. */
        if (subject == NULL || PyBytes_GET_SIZE(subject) != length[0]
            || memcmp(PyBytes_AS_STRING(subject), token[0], length[0]) != 0) {
            Py_XDECREF(subject);
            subject = PyBytes_FromStringAndSize(token[0], length[0]);
            if (subject == NULL) goto done;
        }
        if (PyList_Append(subjects, subject) != 0) goto done;
        if (append_bytes(replies, token[2], length[2]) != 0) goto done;
        if (append_bytes(payloads, payload, size) != 0) goto done;
        frames++;
        payload_bytes += size;
        at = payload + size + 2;
    }
    if (frames == 0) {
        result = Py_NewRef(Py_None);
    } else {
        result = Py_BuildValue("(nnOOOnn)", (Py_ssize_t)(at - data), first_sid, subjects,
                               replies, payloads, frames, payload_bytes);
    }
done:
    Py_XDECREF(subject);
    Py_XDECREF(subjects);
    Py_XDECREF(replies);
    Py_XDECREF(payloads);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef frames_methods[] = {
    {"bulk_frames", bulk_frames, METH_VARARGS,
     "bulk_frames(data, pos) -> (end, sid, subjects, replies, payloads, frames, payload_bytes)"
     " or None: the run of plain MSG frames of one sid from pos on."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef frames_module = {
    PyModuleDef_HEAD_INIT, "_frames", "The bulk read of plain MSG frames.", -1, frames_methods,
};

PyMODINIT_FUNC PyInit__frames(void) { return PyModule_Create(&frames_module); }
