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
 * (end, sid, subjects, replies, payloads, frames, payload_bytes, acks), or None when the first
 * frame is not such a frame. The caller reads whatever stopped it (another operation, another
 * sid, a frame cut by the end of the read) with its own, complete parser. Being stricter than
 * that parser (digits only in numbers, single spaces) only ever hands more to it.
 *
 * `acks` is what every reply subject says (see ack.py): four lists of ints, the stream
 * sequences, consumer sequences, timestamps and pending counts, or None unless every reply is
 * a `$JS.ACK` subject. The puller then reads the replies itself.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <string.h>

/* Longest number accepted: far above any sid or payload size, far below overflow. */
#define MAX_DIGITS 15
/* Longest ack field: a nanosecond timestamp has 19 digits; 18 nines fit in a long long. */
#define MAX_ACK_DIGITS 18
#define ACK_FIELDS 4

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

static int parse_ack_number(const char *text, Py_ssize_t length, long long *value) {
    if (length <= 0 || length > MAX_ACK_DIGITS + 1) return -1;
    unsigned long long result = 0;
    for (Py_ssize_t i = 0; i < length; i++) {
        if (text[i] < '0' || text[i] > '9') return -1;
        result = result * 10 + (unsigned long long)(text[i] - '0');
    }
    if (length > MAX_ACK_DIGITS && result > (unsigned long long)LLONG_MAX) return -1;
    *value = (long long)result;
    return 0;
}

/* The stream sequence, consumer sequence, timestamp and pending count of a `$JS.ACK` reply:
 * v1 `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<time>.<pending>` (9 tokens), v2
 * with a domain and an account hash after ACK (11 tokens) and a random token last (12).
 * Returns the reply's number of tokens, or -1 when it is not such a subject. */
static int ack_fields(const char *reply, Py_ssize_t length, long long *field) {
    const char *token[12], *end = reply + length, *start = reply;
    Py_ssize_t size[12];
    int count = 0;
    for (;;) {
        const char *dot = memchr(start, '.', end - start);
        const char *stop = dot != NULL ? dot : end;
        if (count == 12) return -1;
        token[count] = start;
        size[count] = stop - start;
        count++;
        if (dot == NULL) break;
        start = dot + 1;
    }
    if (count != 9 && count != 11 && count != 12) return -1;
    if (size[0] != 3 || memcmp(token[0], "$JS", 3) != 0) return -1;
    if (size[1] != 3 || memcmp(token[1], "ACK", 3) != 0) return -1;
    int at = count == 9 ? 5 : 7;
    for (int i = 0; i < ACK_FIELDS; i++) {
        if (parse_ack_number(token[at + i], size[at + i], &field[i]) != 0) return -1;
    }
    return count;
}

static int append_number(PyObject *list, long long value) {
    PyObject *item = PyLong_FromLongLong(value);
    if (item == NULL) return -1;
    int failed = PyList_Append(list, item);
    Py_DECREF(item);
    return failed;
}

/* The CRLF that ends the line starting at `line`, or NULL if `end` comes first. */
static const char *line_end(const char *line, const char *end) {
    const char *cr = memchr(line, '\r', end - line);
    while (cr != NULL && (cr + 1 >= end || cr[1] != '\n')) {
        cr = memchr(cr + 1, '\r', end - cr - 1);
    }
    return cr;
}

/* Splits the arguments of a MSG line at single spaces: exactly subject, sid, reply, size.
 * nats-py separates them by any run of whitespace; a line with whitespace other than single
 * spaces (a tab, a lone CR or LF, a vertical tab a server passed on in a subject) is left to the
 * frame reader, which reads it as nats-py does. */
static int msg_arguments(const char *args, const char *eol, const char **token,
                         Py_ssize_t *length) {
    for (const char *c = args; c < eol; c++) {
        if (*c >= '\t' && *c <= '\r') return -1; /* \t \n \v \f \r */
    }
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
    PyObject *acks[ACK_FIELDS] = {NULL, NULL, NULL, NULL};
    PyObject *subject = NULL, *result = NULL;
    int acks_read = 1; /* 0 once a reply is not a $JS.ACK subject */
    if (subjects == NULL || replies == NULL || payloads == NULL) goto done;
    for (int i = 0; i < ACK_FIELDS; i++) {
        if ((acks[i] = PyList_New(0)) == NULL) goto done;
    }
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
        if (acks_read) {
            long long field[ACK_FIELDS];
            if (ack_fields(token[2], length[2], field) < 0) {
                acks_read = 0;
            } else {
                for (int i = 0; i < ACK_FIELDS; i++) {
                    if (append_number(acks[i], field[i]) != 0) goto done;
                }
            }
        }
        frames++;
        payload_bytes += size;
        at = payload + size + 2;
    }
    if (frames == 0) {
        result = Py_NewRef(Py_None);
    } else {
        PyObject *ack_columns = !acks_read
            ? Py_NewRef(Py_None)
            : PyTuple_Pack(ACK_FIELDS, acks[0], acks[1], acks[2], acks[3]);
        if (ack_columns == NULL) goto done;
        result = Py_BuildValue("(nnOOOnnN)", (Py_ssize_t)(at - data), first_sid, subjects,
                               replies, payloads, frames, payload_bytes, ack_columns);
    }
done:
    for (int i = 0; i < ACK_FIELDS; i++) Py_XDECREF(acks[i]);
    Py_XDECREF(subject);
    Py_XDECREF(subjects);
    Py_XDECREF(replies);
    Py_XDECREF(payloads);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef frames_methods[] = {
    {"bulk_frames", bulk_frames, METH_VARARGS,
     "bulk_frames(data, pos) -> (end, sid, subjects, replies, payloads, frames, payload_bytes,"
     " acks) or None: the run of plain MSG frames of one sid from pos on."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef frames_module = {
    PyModuleDef_HEAD_INIT, "_frames", "The bulk read of plain MSG frames.", -1, frames_methods,
};

PyMODINIT_FUNC PyInit__frames(void) { return PyModule_Create(&frames_module); }
