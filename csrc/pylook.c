/*
 * acceptfilter._look: af_look() (aflook.h) for Python, as one call that
 * returns Python objects.
 *
 * Why a CPython extension next to the cffi core: a gunicorn worker looks at
 * every connection it serves, between gunicorn's own code, where each cffi
 * field read, address conversion and buffer unpack is a few hundred
 * nanoseconds of cold Python. Here the look, the address tuple and the bytes
 * are built in C: measured, half the worker's time per request that the look
 * added over plain accept() (README, Performance). cffi cannot return Python
 * objects, hence the C API (the stable ABI: one build for every CPython >= 3.11).
 *
 *   Looker(program, cap, owner)
 *       program: the address of an afm_prog (0: no matcher), which `owner`
 *       (kept referenced) keeps alive: acceptfilter.cmatcher's compiled
 *       matcher; cap: the most bytes one look peeks (1 .. 2**30).
 *   Looker.look(listen_fd) -> None | (fd, address, data, ready, consume)
 *       None: the listen queue is empty. Otherwise the caller owns fd (a
 *       blocking socket); address as socket.accept() gives it; data the peeked
 *       bytes (None: none sent yet); ready: the matcher certified them, and
 *       `consume` bytes were read off. OSError as socket.accept() raises it.
 *
 * One Looker has one peek buffer: look() runs without the GIL, so a second
 * thread calling look() on the same Looker meanwhile gets a RuntimeError.
 */
#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdlib.h>
#include <limits.h>
#include <stdint.h>
#include <sys/socket.h>
#include <unistd.h>

#include "aflook.h"

#define MAX_CAP (1u << 30)

typedef struct {
    PyObject_HEAD
    const afm_prog *prog;
    char *buf;
    uint32_t cap;
    int busy;
    PyObject *owner;
} Looker;

static PyObject *looker_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"program", "cap", "owner", NULL};
    PyObject *program_obj, *owner;
    Py_ssize_t cap;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OnO:Looker", names, &program_obj, &cap, &owner)) return NULL;
    /* Checked, unlike the "K" format: a negative or oversized address is an error, not a wrap. */
    unsigned long long program = PyLong_AsUnsignedLongLong(program_obj);
    if (program == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    if (program > UINTPTR_MAX) {
        PyErr_SetString(PyExc_OverflowError, "program is not an address");
        return NULL;
    }
    if (cap < 1 || cap > (Py_ssize_t)MAX_CAP) {
        PyErr_Format(PyExc_ValueError, "cap must be 1 .. %u bytes, not %zd", MAX_CAP, cap);
        return NULL;
    }
    char *buf = malloc(cap);
    if (!buf) return PyErr_NoMemory();
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Looker *self = (Looker *)alloc(type, 0);
    if (!self) {
        free(buf);
        return NULL;
    }
    self->prog = (const afm_prog *)(uintptr_t)program;
    self->buf = buf;
    self->cap = (uint32_t)cap;
    self->busy = 0;
    Py_INCREF(owner);
    self->owner = owner;
    return (PyObject *)self;
}

static void looker_dealloc(PyObject *obj) {
    Looker *self = (Looker *)obj;
    PyTypeObject *type = Py_TYPE(obj);
    free(self->buf);
    Py_XDECREF(self->owner);
    freefunc tp_free = (freefunc)PyType_GetSlot(type, Py_tp_free);
    tp_free(obj);
    Py_DECREF(type); /* a heap type: each instance holds a reference to it */
}

static PyObject *address(const af_addr *a) {
    if (a->family == AF_INET) return Py_BuildValue("(si)", a->host, a->port);
    if (a->family == AF_INET6) return Py_BuildValue("(siII)", a->host, a->port, a->flowinfo, a->scope_id);
    return PyUnicode_FromString(""); /* AF_UNIX peers are unnamed, as socket.accept() reports them */
}

static PyObject *looker_look(PyObject *obj, PyObject *arg) {
    Looker *self = (Looker *)obj;
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    if (fd < INT_MIN || fd > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "a file descriptor must fit a C int");
        return NULL;
    }
    int listen_fd = (int)fd;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Looker.look() is already running in another thread: one Looker per thread");
        return NULL;
    }
    af_look_out out;
    int rc;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    rc = af_look(listen_fd, self->prog, self->buf, self->cap, &out);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (rc < 0) {
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (out.fd < 0) Py_RETURN_NONE;
    PyObject *addr = address(&out.addr);
    PyObject *data = addr == NULL ? NULL
                     : out.len ? PyBytes_FromStringAndSize(self->buf, (Py_ssize_t)out.len)
                               : Py_NewRef(Py_None);
    PyObject *result = data == NULL ? NULL
                       : Py_BuildValue("(iOOOI)", out.fd, addr, data, out.ready ? Py_True : Py_False, out.consume);
    Py_XDECREF(addr);
    Py_XDECREF(data);
    if (result == NULL) close(out.fd); /* out of memory: the connection is not leaked */
    return result;
}

static PyMethodDef looker_methods[] = {
    {"look", looker_look, METH_O, "The next connection: None, or (fd, address, data, ready, consume)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot looker_slots[] = {
    {Py_tp_new, looker_new},
    {Py_tp_dealloc, looker_dealloc},
    {Py_tp_methods, looker_methods},
    {Py_tp_doc, "One look at a listen socket's next connection: accept4, a peek, the compiled matcher."},
    {0, NULL},
};

static PyType_Spec looker_spec = {
    "acceptfilter._look.Looker", sizeof(Looker), 0, Py_TPFLAGS_DEFAULT, looker_slots,
};

static int look_exec(PyObject *module) {
    PyObject *type = PyType_FromSpec(&looker_spec);
    if (type == NULL) return -1;
    int rc = PyModule_AddObjectRef(module, "Looker", type);
    Py_DECREF(type);
    return rc;
}

static PyModuleDef_Slot look_slots[] = {{Py_mod_exec, look_exec}, {0, NULL}};

static struct PyModuleDef look_module = {
    PyModuleDef_HEAD_INIT, "acceptfilter._look", "af_look() for Python (csrc/pylook.c).", 0, NULL, look_slots,
    NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__look(void) { return PyModuleDef_Init(&look_module); }
