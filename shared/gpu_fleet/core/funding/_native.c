/* The funding matching's hot loops, in C (issue 11); the Python functions named beside each
 * stay the reference, and the tests run both and compare them (``tests/core/test_native.py``,
 * and ``test_fill_equivalence`` run three ways).  A build without a C compiler leaves this
 * module out, and the matching runs in Python (``native.NATIVE``).
 *
 * - ``match_core`` (``matching._match``): the deferred acceptance over integer arrays.  This
 *   is where the gain is: at 100k open leases a million proposals and half a million scanned
 *   candidates were dict reads and comparisons on Python ints, two fifths of an evaluation.
 * - ``claim_walk`` (``matching._walk``): every live lease's claim, its tail and columns.  The
 *   same steps with the same Python objects; its time is mostly memory (lookups in the
 *   fleet's node maps, objects made), so C saves less here than the interpreter's share would
 *   suggest.  A lease of the type the first lease has is read at its fields' offsets (msgspec
 *   keeps a Struct's fields as member slots); any other object through ``getattr``.  What
 *   depends on the run only is asked of ``context(run)`` once per stretch of one run's leases.
 * - ``gather`` and ``take`` (``matching._gather``, ``_take``): the claims' positions gathered
 *   stretch by stretch and the columns laid out in rank order, each one pass over pointers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

enum { F_START, F_END, F_CLOSED, F_ID, F_RUN, F_NODE, F_SLOTS, F_ROLE, F_GROUP, N_FIELDS };

static const char *const FIELD_NAMES[N_FIELDS] = {
    "start", "end", "closed_at", "id", "run", "node", "slots", "role", "group",
};

typedef struct {
    PyTypeObject *type; /* borrowed: the leases' type, kept alive by the list walked */
    Py_ssize_t offset[N_FIELDS];
    PyObject *names[N_FIELDS];
} Layout;

/* The offsets of ``FIELD_NAMES`` in ``type``, if each is an object member slot; else
 * ``layout->type`` stays NULL and every field is read with ``getattr``. */
static int
layout_of(Layout *layout, PyTypeObject *type)
{
    layout->type = NULL;
    for (int i = 0; i < N_FIELDS; i++) {
        PyObject *descr = PyObject_GetAttr((PyObject *)type, layout->names[i]);
        if (descr == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
                return -1;
            }
            PyErr_Clear(); /* read through getattr, which raises for the lease that lacks it */
            return 0;
        }
        int ok = PyObject_TypeCheck(descr, &PyMemberDescr_Type);
        if (ok) {
            PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
            ok = (member->type == T_OBJECT_EX || member->type == T_OBJECT) &&
                 !(member->flags & READ_RESTRICTED);
            layout->offset[i] = member->offset;
        }
        Py_DECREF(descr);
        if (!ok) {
            return 0;
        }
    }
    layout->type = type;
    return 0;
}

/* A new reference to field ``i`` of ``obj``. */
static inline PyObject *
field(const Layout *layout, PyObject *obj, int i)
{
    if (Py_TYPE(obj) == layout->type) {
        PyObject *value = *(PyObject **)((char *)obj + layout->offset[i]);
        if (value != NULL) {
            Py_INCREF(value);
            return value;
        }
    }
    return PyObject_GetAttr(obj, layout->names[i]);
}

/* ``m.get(key)`` as a new reference (``None`` if missing); a dict is read directly. */
static PyObject *
mapping_get(PyObject *m, PyObject *key)
{
    if (PyDict_CheckExact(m)) {
        PyObject *hit = PyDict_GetItemWithError(m, key);
        if (hit == NULL) {
            if (PyErr_Occurred()) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        Py_INCREF(hit);
        return hit;
    }
    PyObject *name = PyUnicode_InternFromString("get");
    if (name == NULL) {
        return NULL;
    }
    PyObject *got = PyObject_CallMethodOneArg(m, name, key);
    Py_DECREF(name);
    return got;
}

/* A float and an exact integer of at most 2**53 (an Instant), compared as doubles: the integer
 * converts exactly, so this is Python's exact comparison (NaN compares false, as in Python). */
static int
compare_float(double x, PyObject *b, int op, int *done)
{
    int overflow;
    long long y = PyLong_AsLongLongAndOverflow(b, &overflow);
    *done = 0;
    if (overflow || (y == -1 && PyErr_Occurred()) || y > (1LL << 53) || y < -(1LL << 53)) {
        PyErr_Clear();
        return 0;
    }
    *done = 1;
    return op == Py_LT ? x < (double)y : x >= (double)y;
}

/* ``a < b`` (``op``: a rich comparison) for two Instants: exact integers compared as such,
 * the clock (a float) against an exact integer as doubles, anything else as Python compares
 * it.  -1 on error. */
static int
compare(PyObject *a, PyObject *b, int op)
{
    if ((op == Py_LT || op == Py_GE) && PyFloat_CheckExact(a) && PyLong_CheckExact(b)) {
        int done;
        int r = compare_float(PyFloat_AS_DOUBLE(a), b, op, &done);
        if (done) {
            return r;
        }
    }
    if (PyLong_CheckExact(a) && PyLong_CheckExact(b)) {
        int overflow_a, overflow_b;
        long long x = PyLong_AsLongLongAndOverflow(a, &overflow_a);
        long long y = PyLong_AsLongLongAndOverflow(b, &overflow_b);
        if (!overflow_a && !overflow_b && !PyErr_Occurred()) {
            switch (op) {
            case Py_LT:
                return x < y;
            case Py_GE:
                return x >= y;
            default:
                break;
            }
        }
        PyErr_Clear();
    }
    return PyObject_RichCompareBool(a, b, op);
}

static PyObject *
claim_walk(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 12) {
        PyErr_Format(PyExc_TypeError, "claim_walk() takes 12 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *leases = args[0], *t = args[1], *runs = args[2], *context = args[3];
    PyObject *node_labels = args[4], *places = args[5], *place_of_node = args[6];
    PyObject *proposer = args[7], *first_slots = args[8], *first_slot = args[9];
    PyObject *active = args[10], *spare = args[11];
    if (!PyList_CheckExact(leases) || !PyDict_CheckExact(places) ||
        !PyDict_CheckExact(first_slots)) {
        PyErr_SetString(PyExc_TypeError, "claim_walk(): leases is a list, places and first_slots dicts");
        return NULL;
    }

    Layout layout;
    for (int i = 0; i < N_FIELDS; i++) {
        layout.names[i] = NULL;
    }
    enum { C_RUN, C_LEASE, C_WIDTH, C_BORROW, C_LISTS, C_ID_ORDER, C_RUN_NUMBER, C_ROLE, N_COLUMNS };
    PyObject *column[N_COLUMNS] = {NULL};
    for (int i = 0; i < N_COLUMNS; i++) {
        column[i] = PyList_New(0);
    }
    PyObject *tails = PyList_New(0), *spans = PyList_New(0), *run_since = PyList_New(0);
    PyObject *run_key_of = PyList_New(0), *live_ids = PyList_New(0), *run_numbers = PyDict_New();
    PyObject *at_place = PyUnicode_InternFromString("at_place");
    PyObject *empty = PyUnicode_FromStringAndSize("", 0);
    /* What the walk keeps from one lease to the next (strong references). */
    PyObject *last_id = NULL, *run_name = NULL, *run_key = NULL, *since = NULL;
    PyObject *borrow_cap = NULL, *run_lists = NULL, *by_place = NULL;
    /* Per lease (strong references, released at the end of each step). */
    PyObject *lease_start = NULL, *end = NULL, *closed = NULL, *lease_id = NULL, *run = NULL;
    PyObject *node = NULL, *labels = NULL, *place = NULL, *proposals = NULL, *slots = NULL;
    PyObject *first = NULL, *role = NULL, *group = NULL, *tail = NULL;
    PyObject *result = NULL;
    Py_ssize_t claims = 0, run_number = 0;
    int unique = 1;

    for (int i = 0; i < N_COLUMNS; i++) {
        if (column[i] == NULL) {
            goto done;
        }
    }
    if (tails == NULL || spans == NULL || run_since == NULL || run_key_of == NULL ||
        live_ids == NULL || run_numbers == NULL || at_place == NULL || empty == NULL) {
        goto done;
    }
    for (int i = 0; i < N_FIELDS; i++) {
        layout.names[i] = PyUnicode_InternFromString(FIELD_NAMES[i]);
        if (layout.names[i] == NULL) {
            goto done;
        }
    }
    layout.type = NULL;
    if (PyList_GET_SIZE(leases) > 0 && layout_of(&layout, Py_TYPE(PyList_GET_ITEM(leases, 0))) < 0) {
        goto done;
    }

#define RELEASE_STEP()                                                                        \
    do {                                                                                      \
        Py_CLEAR(lease_start); Py_CLEAR(end); Py_CLEAR(closed); Py_CLEAR(lease_id);           \
        Py_CLEAR(run); Py_CLEAR(node); Py_CLEAR(labels); Py_CLEAR(place); Py_CLEAR(proposals); \
        Py_CLEAR(slots); Py_CLEAR(first); Py_CLEAR(role); Py_CLEAR(group); Py_CLEAR(tail);     \
    } while (0)

    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(leases); k++) {
        RELEASE_STEP();
        PyObject *lease = PyList_GET_ITEM(leases, k); /* borrowed; the list holds it */
        Py_INCREF(lease);
        int r;
        /* ``Lease.live_at`` */
        if ((lease_start = field(&layout, lease, F_START)) == NULL) {
            goto fail_lease;
        }
        if ((r = compare(t, lease_start, Py_LT)) != 0) {
            Py_DECREF(lease);
            if (r < 0) {
                goto done;
            }
            continue;
        }
        if ((end = field(&layout, lease, F_END)) == NULL ||
            (closed = field(&layout, lease, F_CLOSED)) == NULL) {
            goto fail_lease;
        }
        if (end == Py_None) {
            Py_SETREF(end, Py_NewRef(closed));
        }
        else if (closed != Py_None) {
            if ((r = compare(closed, end, Py_LT)) < 0) {
                goto fail_lease;
            }
            if (r) {
                Py_SETREF(end, Py_NewRef(closed));
            }
        }
        if (end != Py_None) {
            if ((r = compare(t, end, Py_GE)) < 0) {
                goto fail_lease;
            }
            if (r) {
                Py_DECREF(lease);
                continue;
            }
        }
        /* live: its id */
        if ((lease_id = field(&layout, lease, F_ID)) == NULL) {
            goto fail_lease;
        }
        if (last_id != NULL) {
            if ((r = PyObject_RichCompareBool(lease_id, last_id, Py_EQ)) < 0) {
                goto fail_lease;
            }
            if (r) {
                unique = 0;
            }
        }
        Py_XSETREF(last_id, Py_NewRef(lease_id));
        if (PyList_Append(live_ids, lease_id) < 0) {
            goto fail_lease;
        }
        /* a new stretch of one run's leases */
        if ((run = field(&layout, lease, F_RUN)) == NULL) {
            goto fail_lease;
        }
        int changed = 1;
        if (run_name != NULL) {
            if ((changed = PyObject_RichCompareBool(run, run_name, Py_NE)) < 0) {
                goto fail_lease;
            }
        }
        if (changed) {
            Py_XSETREF(run_name, Py_NewRef(run));
            PyObject *got = PyDict_GetItemWithError(run_numbers, run_name); /* borrowed */
            if (got == NULL && PyErr_Occurred()) {
                goto fail_lease;
            }
            Py_ssize_t known = got != NULL;
            if (got != NULL) {
                run_number = PyLong_AsSsize_t(got);
                if (run_number == -1 && PyErr_Occurred()) {
                    goto fail_lease;
                }
            }
            else {
                run_number = PyDict_GET_SIZE(run_numbers);
                PyObject *number = PyLong_FromSsize_t(run_number);
                if (number == NULL) {
                    goto fail_lease;
                }
                r = PyDict_SetItem(run_numbers, run_name, number);
                Py_DECREF(number);
                if (r < 0) {
                    goto fail_lease;
                }
            }
            PyObject *found = mapping_get(runs, run_name);
            if (found == NULL) {
                goto fail_lease;
            }
            Py_CLEAR(run_lists);
            Py_CLEAR(by_place);
            int have = found != Py_None;
            if (have) {
                /* (run key, admission or None, borrow limit or None, RunLists, its by_place) */
                PyObject *ctx = PyObject_CallOneArg(context, found);
                Py_DECREF(found);
                if (ctx == NULL) {
                    goto fail_lease;
                }
                if (!PyTuple_CheckExact(ctx) || PyTuple_GET_SIZE(ctx) != 5 ||
                    !PyDict_CheckExact(PyTuple_GET_ITEM(ctx, 4))) {
                    Py_DECREF(ctx);
                    PyErr_SetString(PyExc_TypeError, "claim_walk(): context(run) is a 5-tuple ending in a dict");
                    goto fail_lease;
                }
                Py_XSETREF(run_key, Py_NewRef(PyTuple_GET_ITEM(ctx, 0)));
                Py_XSETREF(since, Py_NewRef(PyTuple_GET_ITEM(ctx, 1)));
                Py_XSETREF(borrow_cap, Py_NewRef(PyTuple_GET_ITEM(ctx, 2)));
                run_lists = Py_NewRef(PyTuple_GET_ITEM(ctx, 3));
                by_place = Py_NewRef(PyTuple_GET_ITEM(ctx, 4));
                Py_DECREF(ctx);
            }
            else {
                Py_DECREF(found);
            }
            if (!known) {
                if (PyList_Append(run_since, have ? since : Py_None) < 0 ||
                    PyList_Append(run_key_of, have ? run_key : empty) < 0) {
                    goto fail_lease;
                }
            }
            if (have) {
                PyObject *span = Py_BuildValue(
                    "(OOn)", since == Py_None ? lease_start : since, run_key,
                    PyList_GET_SIZE(tails));
                if (span == NULL) {
                    goto fail_lease;
                }
                r = PyList_Append(spans, span);
                Py_DECREF(span);
                if (r < 0) {
                    goto fail_lease;
                }
            }
        }
        if (run_lists == NULL) { /* no such run */
            Py_DECREF(lease);
            continue;
        }
        /* the claim's place, and its proposal list there */
        if ((node = field(&layout, lease, F_NODE)) == NULL ||
            (labels = mapping_get(node_labels, node)) == NULL) {
            goto fail_lease;
        }
        PyObject *kept = PyDict_GetItemWithError(places, node); /* borrowed */
        if (kept == NULL && PyErr_Occurred()) {
            goto fail_lease;
        }
        int same = 0;
        if (kept != NULL) {
            PyObject *kept_labels = PyTuple_GetItem(kept, 0);
            if (kept_labels == NULL) {
                goto fail_lease;
            }
            same = kept_labels == labels;
            if (!same && (same = PyObject_RichCompareBool(kept_labels, labels, Py_EQ)) < 0) {
                goto fail_lease;
            }
            if (same) {
                place = PyTuple_GetItem(kept, 1);
                if (place == NULL) {
                    goto fail_lease;
                }
                Py_INCREF(place);
            }
        }
        if (!same && (place = PyObject_CallFunctionObjArgs(place_of_node, node, labels, NULL)) == NULL) {
            goto fail_lease;
        }
        proposals = PyDict_GetItemWithError(by_place, place);
        if (proposals != NULL) {
            Py_INCREF(proposals);
        }
        else if (PyErr_Occurred() ||
                 (proposals = PyObject_CallMethodObjArgs(run_lists, at_place, place, proposer, NULL)) == NULL) {
            goto fail_lease;
        }
        /* the first slot, parsed once per slot tuple */
        if ((slots = field(&layout, lease, F_SLOTS)) == NULL) {
            goto fail_lease;
        }
        first = PyDict_GetItemWithError(first_slots, slots);
        if (first != NULL) {
            Py_INCREF(first);
        }
        else if (PyErr_Occurred() || (first = PyObject_CallOneArg(first_slot, slots)) == NULL) {
            goto fail_lease;
        }
        Py_ssize_t width = PyObject_Length(slots);
        if (width < 0 || (role = field(&layout, lease, F_ROLE)) == NULL ||
            (group = field(&layout, lease, F_GROUP)) == NULL) {
            goto fail_lease;
        }
        /* the tail (admission or start, run key, group, first slot, lease id), then a column
         * each: run key, lease, width, borrow limit, proposals, place in id order, run's
         * number, role's code */
        tail = PyTuple_Pack(5, since == Py_None ? lease_start : since, run_key, group, first, lease_id);
        if (tail == NULL || PyList_Append(tails, tail) < 0) {
            goto fail_lease;
        }
        {
            PyObject *numbers[3] = {PyLong_FromSsize_t(width), PyLong_FromSsize_t(claims),
                                    PyLong_FromSsize_t(run_number)};
            PyObject *code = PyLong_FromLong(role == active ? 0 : role == spare ? 1 : 2);
            PyObject *items[N_COLUMNS] = {run_key, lease, numbers[0], borrow_cap, proposals,
                                          numbers[1], numbers[2], code};
            int failed = numbers[0] == NULL || numbers[1] == NULL || numbers[2] == NULL || code == NULL;
            for (int i = 0; !failed && i < N_COLUMNS; i++) {
                failed = PyList_Append(column[i], items[i]) < 0;
            }
            Py_XDECREF(numbers[0]);
            Py_XDECREF(numbers[1]);
            Py_XDECREF(numbers[2]);
            Py_XDECREF(code);
            if (failed) {
                goto fail_lease;
            }
        }
        claims++;
        Py_DECREF(lease);
        continue;
    fail_lease:
        Py_DECREF(lease);
        goto done;
    }
    {
        PyObject *names = PyDict_Keys(run_numbers);
        PyObject *columns = PyTuple_New(N_COLUMNS);
        if (names != NULL && columns != NULL) {
            for (int i = 0; i < N_COLUMNS; i++) {
                PyTuple_SET_ITEM(columns, i, Py_NewRef(column[i]));
            }
            result = Py_BuildValue("(OOOOOONO)", tails, columns, spans, run_since, run_key_of,
                                   live_ids, names, unique ? Py_True : Py_False);
        }
        else {
            Py_XDECREF(names);
        }
        Py_XDECREF(columns);
    }
done:
    RELEASE_STEP();
#undef RELEASE_STEP
    Py_XDECREF(last_id);
    Py_XDECREF(run_name);
    Py_XDECREF(run_key);
    Py_XDECREF(since);
    Py_XDECREF(borrow_cap);
    Py_XDECREF(run_lists);
    Py_XDECREF(by_place);
    for (int i = 0; i < N_COLUMNS; i++) {
        Py_XDECREF(column[i]);
    }
    Py_XDECREF(tails);
    Py_XDECREF(spans);
    Py_XDECREF(run_since);
    Py_XDECREF(run_key_of);
    Py_XDECREF(live_ids);
    Py_XDECREF(run_numbers);
    Py_XDECREF(at_place);
    Py_XDECREF(empty);
    for (int i = 0; i < N_FIELDS; i++) {
        Py_XDECREF(layout.names[i]);
    }
    return result;
}


/* ------------------------------------------------------------------------------------------
 * The deferred acceptance (``matching._match``), over integer arrays.
 *
 * Why: at 100k open leases the matching makes about a million proposals in some 130 rounds
 * and scans about half a million candidates, each a few dict lookups and comparisons in
 * Python: the rounds and scans were two fifths of an evaluation.  Here a claim is its
 * position, a rank ``class * n + position`` (``_ClaimTable``), and every counter an array
 * slot.  The steps are ``_match``'s reference steps - every newcomer scanned, no group turned
 * away at once (that is an optimisation the Python matching proves equal) - and what Python
 * objects the result needs (rejections, the GPU-hour checks) come from the callbacks
 * ``matching._match_native`` passes, so the reasons are the very values Python makes.
 * ---------------------------------------------------------------------------------------- */

typedef struct {
    int64_t *data;
    Py_ssize_t len, cap;
} Vec;

static int
vec_push(Vec *v, int64_t x)
{
    if (v->len == v->cap) {
        Py_ssize_t cap = v->cap ? v->cap * 2 : 8;
        int64_t *data = PyMem_Realloc(v->data, (size_t)cap * sizeof(int64_t));
        if (data == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        v->data = data;
        v->cap = cap;
    }
    v->data[v->len++] = x;
    return 0;
}

static int
vec_reserve(Vec *v, Py_ssize_t cap)
{
    if (cap <= v->cap) {
        return 0;
    }
    int64_t *data = PyMem_Realloc(v->data, (size_t)cap * sizeof(int64_t));
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    v->data = data;
    v->cap = cap;
    return 0;
}

/* Sort ``k`` non-negative keys in place: LSD radix sort, 11 bits a pass, as many passes as the
 * largest key needs, through ``tmp`` (room for ``k``).  Why not qsort: a round's keys are
 * sorted about 130 times per matching at 100k open leases, and qsort's compare calls were a
 * third of the C matching's time. */
static void
radix_sort(int64_t *keys, int64_t *tmp, Py_ssize_t k)
{
    enum { BITS = 11, BUCKETS = 1 << BITS };
    int64_t most = 0;
    for (Py_ssize_t i = 0; i < k; i++) {
        if (keys[i] > most) {
            most = keys[i];
        }
    }
    int64_t *src = keys, *dst = tmp;
    Py_ssize_t count[BUCKETS];
    for (int shift = 0; shift < 63 && (most >> shift) > 0; shift += BITS) {
        memset(count, 0, sizeof(count));
        for (Py_ssize_t i = 0; i < k; i++) {
            count[(src[i] >> shift) & (BUCKETS - 1)]++;
        }
        Py_ssize_t total = 0;
        for (int b = 0; b < BUCKETS; b++) {
            Py_ssize_t c = count[b];
            count[b] = total;
            total += c;
        }
        for (Py_ssize_t i = 0; i < k; i++) {
            dst[count[(src[i] >> shift) & (BUCKETS - 1)]++] = src[i];
        }
        int64_t *swap = src;
        src = dst;
        dst = swap;
    }
    if (src != keys) {
        memcpy(keys, src, (size_t)k * sizeof(int64_t));
    }
}

/* An int64 array argument: a writable or read-only contiguous buffer of 8-byte integers. */
typedef struct {
    Py_buffer view;
    int held;
} Arr;

static int
arr_get(Arr *a, PyObject *obj, const char *name, int writable)
{
    a->held = 0;
    if (PyObject_GetBuffer(obj, &a->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        return -1;
    }
    a->held = 1;
    const char *f = a->view.format;
    if (a->view.itemsize != 8 || f == NULL || !(strcmp(f, "l") == 0 || strcmp(f, "q") == 0 || strcmp(f, "<q") == 0 || strcmp(f, "<l") == 0 || strcmp(f, "=q") == 0 || strcmp(f, "=l") == 0)) {
        PyErr_Format(PyExc_TypeError, "match_core(): %s must be a contiguous int64 array", name);
        return -1;
    }
    return 0;
}

/* A float64 array argument, read-only. */
static int
arr_get_double(Arr *a, PyObject *obj, const char *name)
{
    a->held = 0;
    if (PyObject_GetBuffer(obj, &a->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        return -1;
    }
    a->held = 1;
    const char *f = a->view.format;
    if (a->view.itemsize != 8 || f == NULL || !(strcmp(f, "d") == 0 || strcmp(f, "<d") == 0 || strcmp(f, "=d") == 0)) {
        PyErr_Format(PyExc_TypeError, "match_core(): %s must be a contiguous float64 array", name);
        return -1;
    }
    return 0;
}

#define A(a) ((int64_t *)(a).view.buf)
#define D(a) ((double *)(a).view.buf)
#define ALEN(a) ((a).view.len / 8)

enum { LOAN = 0, SPONSOR = 5, OFFER_END_ = -1 };
enum { KIND_PLAIN = 0, KIND_CAPS = 1, KIND_LIMITED = 2 };
enum {
    M_WIDTHS, M_BORROW_CAPS, M_RUNS, M_MINTED, M_STARTS, M_ROW_ACCEPTOR, M_ROW_ENVELOPE,
    M_ROW_TIER, M_ENV_CONCURRENCY, M_ENV_LENDING, M_ENV_KIND, M_ENV_CAP_STARTS, M_ENV_CAPS,
    M_CAP_MOST, M_GROUP_STARTS, M_GROUP_ENVS, M_ENVELOPE_OF, M_ENV_HOURS, M_CAP_HOURS, N_ARRAYS
};
#define FIRST_FLOAT_ARRAY M_ENV_HOURS
static const char *const ARRAY_NAMES[N_ARRAYS] = {
    "widths", "borrow_caps", "runs", "minted", "starts", "row_acceptor", "row_envelope",
    "row_tier", "env_concurrency", "env_lending", "env_kind", "env_cap_starts", "env_caps",
    "cap_most", "group_starts", "group_envs", "envelope_of", "env_hours", "cap_hours",
};

/* ``_hours_ok``: DESIGN decision 1's hysteresis rule, as Python computes it (IEEE doubles, the
 * same operations in the same order; built with -ffp-contract=off so none is fused). */
static inline int
hours_ok(double remaining, double period, int64_t above, int64_t width, int already, double eps)
{
    if (already) {
        return remaining > period * (double)above + eps;
    }
    return remaining + eps >= period * (double)(above + width) && remaining > eps;
}

/* What the GPU-hour checks that passed leave in ``HoursChecks``, per envelope (slots 0..E-1)
 * and cap (E..): all maxima and minima, so Python applies them once at the end. */
typedef struct {
    double *strict, *weak;
    int64_t *top;
    char *checked, *has_weak;
    int64_t narrowest; /* -1: none */
    Vec already;       /* (position, envelope) pairs that passed as funded before */
} Checks;

static int
note_pass(Checks *ch, Py_ssize_t slot, double period, int64_t above, int64_t width, int already,
          double eps, int64_t position, int64_t env)
{
    if (already) {
        double strict = period * (double)above + eps;
        if (!ch->checked[slot] || strict > ch->strict[slot]) {
            ch->strict[slot] = strict;
        }
        if (vec_push(&ch->already, position) < 0 || vec_push(&ch->already, env) < 0) {
            return -1;
        }
    }
    else {
        if (!ch->checked[slot] || eps > ch->strict[slot]) {
            ch->strict[slot] = eps;
        }
        double weak = period * (double)(above + width);
        if (!ch->has_weak[slot] || weak > ch->weak[slot]) {
            ch->weak[slot] = weak;
            ch->has_weak[slot] = 1;
        }
        if (ch->narrowest < 0 || width < ch->narrowest) {
            ch->narrowest = width;
        }
        above += width;
    }
    if (!ch->checked[slot] || above > ch->top[slot]) {
        ch->top[slot] = above;
    }
    ch->checked[slot] = 1;
    return 0;
}

typedef struct {
    Vec ranks;          /* every claim turned away, in order */
    PyObject *ends;     /* list: per entry, where its ranks end */
    PyObject *reasons;  /* list: per entry, the rejection */
    PyObject *last;     /* borrowed from reasons: the last entry's rejection */
} Log;

/* Note ``rank`` turned away for ``reason`` (a new reference, consumed). */
static int
log_reject(Log *log, int64_t rank, PyObject *reason)
{
    if (vec_push(&log->ranks, rank) < 0) {
        Py_DECREF(reason);
        return -1;
    }
    if (reason == log->last) {
        Py_DECREF(reason);
        PyObject *end = PyLong_FromSsize_t(log->ranks.len);
        if (end == NULL) {
            return -1;
        }
        Py_ssize_t i = PyList_GET_SIZE(log->ends) - 1;
        PyList_SetItem(log->ends, i, end); /* steals end */
        return 0;
    }
    PyObject *end = PyLong_FromSsize_t(log->ranks.len);
    if (end == NULL) {
        Py_DECREF(reason);
        return -1;
    }
    int r = PyList_Append(log->ends, end);
    Py_DECREF(end);
    if (r == 0) {
        r = PyList_Append(log->reasons, reason);
    }
    log->last = reason;
    Py_DECREF(reason); /* the list holds it */
    return r;
}

/* Was the claim at ``position`` funded by envelope ``env`` just before (``previously_funded``)?
 * -1 on error. */
static int
funded_before(PyObject *already_cb, int64_t position, int64_t env)
{
    if (already_cb == Py_None) {
        return 0;
    }
    PyObject *got = PyObject_CallFunction(already_cb, "LL", (long long)position, (long long)env);
    if (got == NULL) {
        return -1;
    }
    int r = PyObject_IsTrue(got);
    Py_DECREF(got);
    return r;
}

static PyObject *
match_core(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != N_ARRAYS + 12) {
        PyErr_Format(PyExc_TypeError, "match_core() takes %d arguments (%zd given)", N_ARRAYS + 12, nargs);
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(args[0]);
    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *full_cb = args[N_ARRAYS + 1], *lent_cb = args[N_ARRAYS + 2];
    PyObject *borrow_cb = args[N_ARRAYS + 3], *cap_full = args[N_ARRAYS + 4];
    PyObject *cap_spent = args[N_ARRAYS + 5], *env_spent = args[N_ARRAYS + 6];
    PyObject *already_cb = args[N_ARRAYS + 7]; /* None: nothing was funded before */
    int any_borrow_cap = PyObject_IsTrue(args[N_ARRAYS + 8]);
    if (any_borrow_cap < 0) {
        return NULL;
    }
    const long long NO_TIER = PyLong_AsLongLong(args[N_ARRAYS + 9]); /* a sponsor's row */
    if (NO_TIER == -1 && PyErr_Occurred()) {
        return NULL;
    }
    const double period = PyFloat_AsDouble(args[N_ARRAYS + 10]);
    const double eps = PyFloat_AsDouble(args[N_ARRAYS + 11]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    const int record = 1; /* the checks are always noted; the caller keeps them if it records */
    Checks checks = {NULL, NULL, NULL, NULL, NULL, -1, {0}};
    Vec exhausted = {0};
    Arr arr[N_ARRAYS];
    for (int i = 0; i < N_ARRAYS; i++) {
        arr[i].held = 0;
    }
    PyObject *result = NULL;
    Py_ssize_t n_env = 0, n_groups = 0, n_caps = 0;
    Vec *held = NULL;          /* per acceptor group, the ranks it holds, in rank order */
    int64_t *junior = NULL, *capped_from = NULL, *next_row = NULL;
    int64_t *used = NULL, *lent = NULL, *cap_used = NULL, *borrowed = NULL;
    int64_t *peak_used = NULL, *peak_lent = NULL, *peak_cap = NULL;
    char *turned = NULL, *cap_touched = NULL;
    Vec visited = {0}; /* acceptor groups in the order they first received a proposal */
    PyObject **full_obj = NULL;
    int64_t *full_u = NULL;
    Vec proposing = {0}, pending = {0}, keys = {0}, candidates = {0}, accepted = {0}, sorting = {0};
    Log log = {{0}, NULL, NULL, NULL};
    Py_ssize_t n_runs = 0;

    /* tuples: nothing a callback does can change them while the scan reads them */
    if (!PyTuple_CheckExact(cap_full) || !PyTuple_CheckExact(cap_spent) || !PyTuple_CheckExact(env_spent)) {
        PyErr_SetString(PyExc_TypeError, "match_core(): cap_full, cap_spent and env_spent are tuples");
        return NULL;
    }
    for (int i = 0; i < N_ARRAYS; i++) {
        int got = i >= FIRST_FLOAT_ARRAY ? arr_get_double(&arr[i], args[i + 1], ARRAY_NAMES[i])
                                         : arr_get(&arr[i], args[i + 1], ARRAY_NAMES[i], i == M_ENVELOPE_OF);
        if (got < 0) {
            goto done;
        }
    }
    int64_t *widths = A(arr[M_WIDTHS]), *borrow_caps = A(arr[M_BORROW_CAPS]);
    int64_t *runs = A(arr[M_RUNS]), *minted = A(arr[M_MINTED]), *starts = A(arr[M_STARTS]);
    int64_t *row_acceptor = A(arr[M_ROW_ACCEPTOR]), *row_envelope = A(arr[M_ROW_ENVELOPE]);
    int64_t *row_tier = A(arr[M_ROW_TIER]);
    int64_t *env_concurrency = A(arr[M_ENV_CONCURRENCY]), *env_lending = A(arr[M_ENV_LENDING]);
    int64_t *env_kind = A(arr[M_ENV_KIND]), *env_cap_starts = A(arr[M_ENV_CAP_STARTS]);
    int64_t *env_caps = A(arr[M_ENV_CAPS]), *cap_most = A(arr[M_CAP_MOST]);
    int64_t *group_starts = A(arr[M_GROUP_STARTS]), *group_envs = A(arr[M_GROUP_ENVS]);
    int64_t *envelope_of = A(arr[M_ENVELOPE_OF]);
    double *env_hours = D(arr[M_ENV_HOURS]), *cap_hours = D(arr[M_CAP_HOURS]); /* NaN: none */
    n_env = ALEN(arr[M_ENV_CONCURRENCY]);
    n_groups = ALEN(arr[M_GROUP_STARTS]) - 1;
    n_caps = ALEN(arr[M_CAP_MOST]);
    Py_ssize_t n_rows = ALEN(arr[M_ROW_ACCEPTOR]);
    if (ALEN(arr[M_WIDTHS]) != n || ALEN(arr[M_BORROW_CAPS]) != n || ALEN(arr[M_RUNS]) != n ||
        ALEN(arr[M_MINTED]) != n || ALEN(arr[M_STARTS]) != n || ALEN(arr[M_ENVELOPE_OF]) != n ||
        ALEN(arr[M_ROW_ENVELOPE]) != n_rows || ALEN(arr[M_ROW_TIER]) != n_rows ||
        ALEN(arr[M_ENV_LENDING]) != n_env || ALEN(arr[M_ENV_KIND]) != n_env ||
        ALEN(arr[M_ENV_CAP_STARTS]) != n_env + 1 || n_groups < 0 ||
        ALEN(arr[M_ENV_HOURS]) != n_env || ALEN(arr[M_CAP_HOURS]) != n_caps ||
        PyTuple_GET_SIZE(cap_full) != n_env || PyTuple_GET_SIZE(cap_spent) != n_env ||
        PyTuple_GET_SIZE(env_spent) != n_env) {
        PyErr_SetString(PyExc_ValueError, "match_core(): array lengths disagree");
        goto done;
    }
    /* Every index in range, so a malformed array raises instead of reading out of bounds: each
     * list ends (the last row is an end), rows name groups and envelopes, envelopes caps, runs
     * are numbers. */
    {
        const char *bad = NULL;
        Py_ssize_t n_group_envs = ALEN(arr[M_GROUP_ENVS]);
        if (n > 0 && (n_rows == 0 || row_acceptor[n_rows - 1] != OFFER_END_)) {
            bad = "row_acceptor (a list without its end row)";
        }
        for (Py_ssize_t i = 0; !bad && i < n; i++) {
            if (runs[i] < 0) {
                bad = "runs";
            }
            else if (starts[i] < 0 || starts[i] >= n_rows) {
                bad = "starts";
            }
            else if (runs[i] + 1 > n_runs) {
                n_runs = runs[i] + 1;
            }
        }
        for (Py_ssize_t r = 0; !bad && r < n_rows; r++) {
            int64_t acceptor = row_acceptor[r], tier = row_tier[r];
            if (acceptor == OFFER_END_) {
                continue;
            }
            if (acceptor < 0 || acceptor >= n_groups) {
                bad = "row_acceptor";
            }
            else if (row_envelope[r] < 0 || row_envelope[r] >= n_env) {
                bad = "row_envelope";
            }
            else if (tier != NO_TIER && (tier < 0 || tier > SPONSOR)) {
                bad = "row_tier";
            }
        }
        for (Py_ssize_t e = 0; !bad && e < n_env; e++) {
            if (env_cap_starts[e] < 0 || env_cap_starts[e] > env_cap_starts[e + 1] ||
                env_cap_starts[e + 1] > ALEN(arr[M_ENV_CAPS])) {
                bad = "env_cap_starts";
            }
        }
        for (Py_ssize_t c = 0; !bad && c < ALEN(arr[M_ENV_CAPS]); c++) {
            if (env_caps[c] < 0 || env_caps[c] >= n_caps) {
                bad = "env_caps";
            }
        }
        if (!bad && (n_group_envs != n_env || (n_groups >= 0 && group_starts[0] != 0))) {
            bad = "group_envs";
        }
        for (Py_ssize_t g = 0; !bad && g < n_groups; g++) {
            if (group_starts[g] > group_starts[g + 1] || group_starts[g + 1] > n_group_envs) {
                bad = "group_starts";
            }
        }
        for (Py_ssize_t i = 0; !bad && i < n_group_envs; i++) {
            if (group_envs[i] < 0 || group_envs[i] >= n_env) {
                bad = "group_envs";
            }
        }
        if (bad != NULL) {
            PyErr_Format(PyExc_ValueError, "match_core(): %s holds an index out of range", bad);
            goto done;
        }
    }
    held = PyMem_Calloc((size_t)n_groups + 1, sizeof(Vec));
    junior = PyMem_Malloc(((size_t)n_groups + 1) * sizeof(int64_t));
    capped_from = PyMem_Malloc(((size_t)n_groups + 1) * sizeof(int64_t));
    turned = PyMem_Calloc((size_t)n_groups + 1, 1);
    next_row = PyMem_Calloc((size_t)n + 1, sizeof(int64_t));
    used = PyMem_Calloc((size_t)n_env + 1, sizeof(int64_t));
    lent = PyMem_Calloc((size_t)n_env + 1, sizeof(int64_t));
    peak_used = PyMem_Calloc((size_t)n_env + 1, sizeof(int64_t));
    peak_lent = PyMem_Calloc((size_t)n_env + 1, sizeof(int64_t));
    full_obj = PyMem_Calloc((size_t)n_env + 1, sizeof(PyObject *));
    full_u = PyMem_Calloc((size_t)n_env + 1, sizeof(int64_t));
    cap_used = PyMem_Calloc((size_t)n_caps + 1, sizeof(int64_t));
    peak_cap = PyMem_Calloc((size_t)n_caps + 1, sizeof(int64_t));
    cap_touched = PyMem_Calloc((size_t)n_caps + 1, 1);
    borrowed = PyMem_Calloc((size_t)n_runs + 1, sizeof(int64_t));
    log.ends = PyList_New(0);
    log.reasons = PyList_New(0);
    {
        size_t slots = (size_t)n_env + (size_t)n_caps + 1;
        checks.strict = PyMem_Calloc(slots, sizeof(double));
        checks.weak = PyMem_Calloc(slots, sizeof(double));
        checks.top = PyMem_Calloc(slots, sizeof(int64_t));
        checks.checked = PyMem_Calloc(slots, 1);
        checks.has_weak = PyMem_Calloc(slots, 1);
        if (!checks.strict || !checks.weak || !checks.top || !checks.checked || !checks.has_weak) {
            PyErr_NoMemory();
            goto done;
        }
    }
    if (!held || !junior || !capped_from || !turned || !next_row || !used || !lent || !peak_used ||
        !peak_lent || !full_obj || !full_u || !cap_used || !peak_cap || !cap_touched || !borrowed) {
        PyErr_NoMemory();
        goto done;
    }
    if (log.ends == NULL || log.reasons == NULL) {
        goto done;
    }
    for (Py_ssize_t g = 0; g < n_groups; g++) {
        junior[g] = -1;
        capped_from[g] = -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        envelope_of[i] = -1;
    }
    const int64_t sponsor_from = (int64_t)SPONSOR * n;
    const int64_t span = (int64_t)(SPONSOR + 1) * n;
    if (vec_reserve(&proposing, n) < 0) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        proposing.data[proposing.len++] = i;
    }
    while (proposing.len) {
        /* One round: every claim turned away proposes to its next envelope. */
        keys.len = 0;
        if (vec_reserve(&keys, proposing.len) < 0) {
            goto done;
        }
        for (Py_ssize_t k = 0; k < proposing.len; k++) {
            int64_t position = proposing.data[k] % n;
            int64_t row = starts[position] + next_row[position];
            int64_t acceptor = row_acceptor[row];
            if (acceptor == OFFER_END_) {
                continue;
            }
            next_row[position]++;
            int64_t env = row_envelope[row], rank_class = row_tier[row];
            if (rank_class == NO_TIER) {
                rank_class = minted[position] == env ? LOAN : SPONSOR;
            }
            envelope_of[position] = env;
            keys.data[keys.len++] = acceptor * span + rank_class * n + position;
        }
        proposing.len = 0;
        if (vec_reserve(&sorting, keys.len) < 0) {
            goto done;
        }
        radix_sort(keys.data, sorting.data, keys.len);
        for (Py_ssize_t first = 0; first < keys.len;) {
            int64_t acceptor = keys.data[first] / span;
            Py_ssize_t end = first;
            while (end < keys.len && keys.data[end] / span == acceptor) {
                end++;
            }
            Vec *entries = &held[acceptor];
            Py_ssize_t keep = entries->len;
            int64_t inc0 = keys.data[first] % span;
            candidates.len = 0;
            if (vec_reserve(&candidates, entries->len + (end - first)) < 0) {
                goto done;
            }
            if (entries->len && inc0 < entries->data[entries->len - 1]) {
                int64_t bound = inc0;
                if (capped_from[acceptor] >= 0 && capped_from[acceptor] < bound) {
                    bound = capped_from[acceptor];
                }
                /* bisect_left */
                Py_ssize_t lo = 0, hi = entries->len;
                while (lo < hi) {
                    Py_ssize_t mid = (lo + hi) / 2;
                    if (entries->data[mid] < bound) {
                        lo = mid + 1;
                    }
                    else {
                        hi = mid;
                    }
                }
                keep = lo;
                /* ``_release``: the held claims from ``keep`` on are decided again */
                for (Py_ssize_t i = keep; i < entries->len; i++) {
                    int64_t rank = entries->data[i], position = rank % n;
                    int64_t w = widths[position], env = envelope_of[position];
                    used[env] -= w;
                    if (rank < n || rank >= sponsor_from) {
                        lent[env] -= w;
                        borrowed[runs[position]] -= w;
                    }
                    for (int64_t c = env_cap_starts[env]; c < env_cap_starts[env + 1]; c++) {
                        cap_used[env_caps[c]] -= w;
                    }
                }
                /* merge the two sorted runs */
                Py_ssize_t i = keep, j = first;
                while (i < entries->len || j < end) {
                    int64_t take;
                    if (j >= end || (i < entries->len && entries->data[i] < keys.data[j] % span)) {
                        take = entries->data[i++];
                    }
                    else {
                        take = keys.data[j++] % span;
                    }
                    candidates.data[candidates.len++] = take;
                }
            }
            else {
                for (Py_ssize_t j = first; j < end; j++) {
                    candidates.data[candidates.len++] = keys.data[j] % span;
                }
            }
            int64_t last_candidate = candidates.data[candidates.len - 1];
            if (junior[acceptor] < 0 && vec_push(&visited, acceptor) < 0) {
                goto done;
            }
            if (junior[acceptor] < 0 || last_candidate > junior[acceptor]) {
                junior[acceptor] = last_candidate;
            }
            /* the scan (``_Decider``): greedy in rank order, with skip semantics */
            accepted.len = 0;
            if (vec_reserve(&accepted, candidates.len) < 0) {
                goto done;
            }
            for (Py_ssize_t ci = 0; ci < candidates.len; ci++) {
                int64_t rank = candidates.data[ci], position = rank % n;
                int64_t w = widths[position], env = envelope_of[position];
                int64_t u = used[env];
                PyObject *reason = NULL; /* new reference when set */
                if (u + w > env_concurrency[env]) {
                    if (full_obj[env] == NULL || full_u[env] != u) {
                        PyObject *made = PyObject_CallFunction(full_cb, "LL", (long long)env, (long long)u);
                        if (made == NULL) {
                            goto done;
                        }
                        Py_XSETREF(full_obj[env], made);
                        full_u[env] = u;
                    }
                    reason = Py_NewRef(full_obj[env]);
                }
                else {
                    int is_borrow = rank < n || rank >= sponsor_from;
                    int64_t cap;
                    if (is_borrow && env_lending[env] >= 0 && lent[env] + w > env_lending[env]) {
                        reason = PyObject_CallFunction(lent_cb, "LL", (long long)env, (long long)lent[env]);
                        if (reason == NULL) {
                            goto done;
                        }
                    }
                    else if (is_borrow && (cap = borrow_caps[position]) >= 0 &&
                             borrowed[runs[position]] + w > cap) {
                        reason = PyObject_CallFunction(borrow_cb, "LL", (long long)env, (long long)cap);
                        if (reason == NULL) {
                            goto done;
                        }
                    }
                    else if (env_kind[env] == KIND_CAPS) {
                        for (int64_t c = env_cap_starts[env]; c < env_cap_starts[env + 1]; c++) {
                            int64_t cap_number = env_caps[c];
                            cap_touched[cap_number] = 1;
                            if (cap_most[cap_number] >= 0 && cap_used[cap_number] + w > cap_most[cap_number]) {
                                PyObject *of_env = PyTuple_GET_ITEM(cap_full, env);
                                reason = PySequence_GetItem(of_env, c - env_cap_starts[env]);
                                if (reason == NULL) {
                                    goto done;
                                }
                                break;
                            }
                        }
                    }
                    else if (env_kind[env] == KIND_LIMITED) {
                        /* ``_Decider._limited``: each cap's concurrency and GPU-hours in order,
                         * then the envelope's GPU-hours */
                        int already = -1;
                        int64_t c0 = env_cap_starts[env];
                        for (int64_t c = c0; c < env_cap_starts[env + 1] && reason == NULL; c++) {
                            int64_t cap_number = env_caps[c];
                            int64_t above = cap_used[cap_number];
                            cap_touched[cap_number] = 1;
                            if (cap_most[cap_number] >= 0 && above + w > cap_most[cap_number]) {
                                if ((reason = PySequence_GetItem(PyTuple_GET_ITEM(cap_full, env), c - c0)) == NULL) {
                                    goto done;
                                }
                                break;
                            }
                            double left = cap_hours[cap_number];
                            if (left == left) { /* not NaN: the cap sets GPU-hours */
                                if (already < 0 && (already = funded_before(already_cb, position, env)) < 0) {
                                    goto done;
                                }
                                if (!hours_ok(left, period, above, w, already, eps)) {
                                    if ((reason = PySequence_GetItem(PyTuple_GET_ITEM(cap_spent, env), c - c0)) == NULL) {
                                        goto done;
                                    }
                                    break;
                                }
                                if (record && note_pass(&checks, n_env + cap_number, period, above, w, already, eps,
                                                        position, env) < 0) {
                                    goto done;
                                }
                            }
                        }
                        double left = env_hours[env];
                        if (reason == NULL && left == left) {
                            if (already < 0 && (already = funded_before(already_cb, position, env)) < 0) {
                                goto done;
                            }
                            if (!hours_ok(left, period, u, w, already, eps)) {
                                if (record && vec_push(&exhausted, env) < 0) {
                                    goto done;
                                }
                                reason = Py_NewRef(PyTuple_GET_ITEM(env_spent, env));
                            }
                            else if (record && note_pass(&checks, env, period, u, w, already, eps, position, env) < 0) {
                                goto done;
                            }
                        }
                    }
                    if (reason == NULL) {
                        used[env] = u + w;
                        if (is_borrow) {
                            lent[env] += w;
                            borrowed[runs[position]] += w;
                        }
                        for (int64_t c = env_cap_starts[env]; c < env_cap_starts[env + 1]; c++) {
                            cap_used[env_caps[c]] += w;
                            cap_touched[env_caps[c]] = 1;
                        }
                        accepted.data[accepted.len++] = rank;
                        continue;
                    }
                }
                /* turned away: logged, and proposes again next round */
                turned[acceptor] = 1;
                if (log_reject(&log, rank, reason) < 0 || vec_push(&pending, rank) < 0) {
                    goto done;
                }
            }
            /* ``_close_scan``: the counters' peaks over every scan's end */
            for (int64_t gi = group_starts[acceptor]; gi < group_starts[acceptor + 1]; gi++) {
                int64_t env = group_envs[gi];
                if (used[env] > peak_used[env]) {
                    peak_used[env] = used[env];
                }
                if (lent[env] > peak_lent[env]) {
                    peak_lent[env] = lent[env];
                }
                for (int64_t c = env_cap_starts[env]; c < env_cap_starts[env + 1]; c++) {
                    int64_t cap_number = env_caps[c];
                    if (cap_touched[cap_number] && cap_used[cap_number] > peak_cap[cap_number]) {
                        peak_cap[cap_number] = cap_used[cap_number];
                    }
                }
            }
            /* the most senior held loan under a borrow limit */
            if (any_borrow_cap && (keep < entries->len || capped_from[acceptor] < 0)) {
                int64_t first_capped = -1;
                for (Py_ssize_t i = 0; i < accepted.len; i++) {
                    int64_t rank = accepted.data[i];
                    if ((rank < n || rank >= sponsor_from) && borrow_caps[rank % n] >= 0) {
                        first_capped = rank;
                        break;
                    }
                }
                capped_from[acceptor] = first_capped;
            }
            entries->len = keep;
            if (vec_reserve(entries, keep + accepted.len) < 0) {
                goto done;
            }
            if (accepted.len) {
                memcpy(entries->data + keep, accepted.data, (size_t)accepted.len * sizeof(int64_t));
            }
            entries->len = keep + accepted.len;
            first = end;
        }
        /* the claims turned away propose next round */
        Vec swap = proposing;
        proposing = pending;
        pending = swap;
        pending.len = 0;
    }
    {
        /* (held, junior, turned away at, log ranks, log ends, log reasons, peaks used, lent, cap) */
        PyObject *held_out = PyDict_New(), *junior_out = PyDict_New(), *turned_out = PyList_New(0);
        PyObject *ranks_out = PyBytes_FromStringAndSize((const char *)log.ranks.data,
                                                        log.ranks.len * (Py_ssize_t)sizeof(int64_t));
        PyObject *peaks = PyTuple_New(3);
        Py_ssize_t slots = n_env + n_caps;
        /* (strict, weak, top as bytes; checked, has_weak as bytes; narrowest; already pairs; exhausted) */
        PyObject *hours_out = Py_BuildValue(
            "(y#y#y#y#y#ny#y#)", (const char *)checks.strict, slots * (Py_ssize_t)sizeof(double),
            (const char *)checks.weak, slots * (Py_ssize_t)sizeof(double), (const char *)checks.top,
            slots * (Py_ssize_t)sizeof(int64_t), (const char *)checks.checked, slots,
            (const char *)checks.has_weak, slots, (Py_ssize_t)checks.narrowest,
            (const char *)checks.already.data, checks.already.len * (Py_ssize_t)sizeof(int64_t),
            (const char *)exhausted.data, exhausted.len * (Py_ssize_t)sizeof(int64_t));
        int ok = held_out && junior_out && turned_out && ranks_out && peaks && hours_out;
        for (Py_ssize_t vi = 0; ok && vi < visited.len; vi++) {
            Py_ssize_t g = visited.data[vi];
            PyObject *key = PyLong_FromSsize_t(g), *list = PyList_New(held[g].len);
            PyObject *j = PyLong_FromLongLong(junior[g]);
            ok = key && list && j;
            for (Py_ssize_t i = 0; ok && i < held[g].len; i++) {
                PyObject *v = PyLong_FromLongLong(held[g].data[i]);
                ok = v != NULL;
                if (ok) {
                    PyList_SET_ITEM(list, i, v);
                }
            }
            ok = ok && PyDict_SetItem(held_out, key, list) == 0 && PyDict_SetItem(junior_out, key, j) == 0 &&
                 (!turned[g] || PyList_Append(turned_out, key) == 0);
            Py_XDECREF(key);
            Py_XDECREF(list);
            Py_XDECREF(j);
        }
        if (ok) {
            int64_t *sources[3] = {peak_used, peak_lent, peak_cap};
            Py_ssize_t sizes[3] = {n_env, n_env, n_caps};
            for (int i = 0; ok && i < 3; i++) {
                PyObject *b = PyBytes_FromStringAndSize((const char *)sources[i], sizes[i] * (Py_ssize_t)sizeof(int64_t));
                ok = b != NULL;
                if (ok) {
                    PyTuple_SET_ITEM(peaks, i, b);
                }
            }
        }
        if (ok) {
            result = PyTuple_Pack(8, held_out, junior_out, turned_out, ranks_out, log.ends, log.reasons, peaks,
                                  hours_out);
        }
        Py_XDECREF(held_out);
        Py_XDECREF(junior_out);
        Py_XDECREF(turned_out);
        Py_XDECREF(ranks_out);
        Py_XDECREF(peaks);
        Py_XDECREF(hours_out);
    }
done:
    for (int i = 0; i < N_ARRAYS; i++) {
        if (arr[i].held) {
            PyBuffer_Release(&arr[i].view);
        }
    }
    if (held != NULL) {
        for (Py_ssize_t g = 0; g < n_groups; g++) {
            PyMem_Free(held[g].data);
        }
    }
    if (full_obj != NULL) {
        for (Py_ssize_t e = 0; e < n_env; e++) {
            Py_XDECREF(full_obj[e]);
        }
    }
    PyMem_Free(held);
    PyMem_Free(junior);
    PyMem_Free(capped_from);
    PyMem_Free(turned);
    PyMem_Free(next_row);
    PyMem_Free(used);
    PyMem_Free(lent);
    PyMem_Free(peak_used);
    PyMem_Free(peak_lent);
    PyMem_Free(full_obj);
    PyMem_Free(full_u);
    PyMem_Free(cap_used);
    PyMem_Free(peak_cap);
    PyMem_Free(cap_touched);
    PyMem_Free(borrowed);
    PyMem_Free(visited.data);
    PyMem_Free(checks.strict);
    PyMem_Free(checks.weak);
    PyMem_Free(checks.top);
    PyMem_Free(checks.checked);
    PyMem_Free(checks.has_weak);
    PyMem_Free(checks.already.data);
    PyMem_Free(exhausted.data);
    PyMem_Free(proposing.data);
    PyMem_Free(pending.data);
    PyMem_Free(keys.data);
    PyMem_Free(sorting.data);
    PyMem_Free(candidates.data);
    PyMem_Free(accepted.data);
    PyMem_Free(log.ranks.data);
    Py_XDECREF(log.ends);
    Py_XDECREF(log.reasons);
    return result;
}


/* ------------------------------------------------------------------------------------------
 * Two steps of ``_claims`` after the walk: the claims' positions gathered stretch by stretch
 * (``matching._gather``) and every column laid out in rank order (``matching._take``).  Why:
 * in Python the stretches are 15k slices chained, and a claim's row of nine was made, sorted
 * and freed; here each is one pass copying pointers.  Neither trusts a length read before it
 * allocates: an allocation may run the cyclic collector, and a finalizer Python code.
 * ---------------------------------------------------------------------------------------- */

static PyObject *
gather(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3 || !PyList_CheckExact(args[0]) || !PyList_CheckExact(args[1]) ||
        !PyList_CheckExact(args[2]) || PyList_GET_SIZE(args[1]) != PyList_GET_SIZE(args[2])) {
        PyErr_SetString(PyExc_TypeError, "gather(rows, starts, ends): a list and two lists of one length");
        return NULL;
    }
    PyObject *rows = args[0], *starts = args[1], *ends = args[2];
    Py_ssize_t n = PyList_GET_SIZE(rows), total = 0, spans = PyList_GET_SIZE(starts);
    for (Py_ssize_t i = 0; i < spans; i++) {
        Py_ssize_t a = PyLong_AsSsize_t(PyList_GET_ITEM(starts, i));
        Py_ssize_t b = PyLong_AsSsize_t(PyList_GET_ITEM(ends, i));
        if ((a == -1 || b == -1) && PyErr_Occurred()) {
            return NULL;
        }
        if (a < 0 || b < a || b > n) {
            PyErr_SetString(PyExc_ValueError, "gather(): a stretch outside the rows");
            return NULL;
        }
        total += b - a;
    }
    PyObject *out = PyList_New(total);
    if (out == NULL) {
        return NULL;
    }
    if (PyList_GET_SIZE(rows) != n || PyList_GET_SIZE(starts) != spans || PyList_GET_SIZE(ends) != spans) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_RuntimeError, "gather(): its lists changed while it ran");
        return NULL;
    }
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < spans; i++) {
        Py_ssize_t a = PyLong_AsSsize_t(PyList_GET_ITEM(starts, i));
        Py_ssize_t b = PyLong_AsSsize_t(PyList_GET_ITEM(ends, i));
        if ((a == -1 || b == -1) && PyErr_Occurred()) {
            Py_DECREF(out);
            return NULL;
        }
        if (a < 0 || b < a || b > n || k + (b - a) > total) {
            Py_DECREF(out);
            PyErr_SetString(PyExc_RuntimeError, "gather(): its lists changed while it ran");
            return NULL;
        }
        for (Py_ssize_t j = a; j < b; j++) {
            PyObject *row = PyList_GET_ITEM(rows, j);
            Py_INCREF(row);
            PyList_SET_ITEM(out, k++, row);
        }
    }
    if (k != total) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_RuntimeError, "gather(): its lists changed while it ran");
        return NULL;
    }
    return out;
}

static PyObject *
take(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2 || !PyTuple_CheckExact(args[0]) || !PyList_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "take(columns, order): a tuple of lists and a list");
        return NULL;
    }
    PyObject *columns = args[0], *order = args[1];
    Py_ssize_t width = PyTuple_GET_SIZE(columns), n = PyList_GET_SIZE(order);
    Py_ssize_t *at = PyMem_Malloc(((size_t)n + 1) * sizeof(Py_ssize_t));
    if (at == NULL) {
        return PyErr_NoMemory();
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        at[j] = PyLong_AsSsize_t(PyList_GET_ITEM(order, j));
        if (at[j] == -1 && PyErr_Occurred()) {
            PyMem_Free(at);
            return NULL;
        }
    }
    PyObject *out = PyTuple_New(width);
    for (Py_ssize_t i = 0; out != NULL && i < width; i++) {
        PyObject *column = PyTuple_GET_ITEM(columns, i);
        PyObject *taken = PyList_CheckExact(column) ? PyList_New(n) : NULL;
        /* the size read after the allocation, which may run Python code */
        Py_ssize_t size = taken != NULL ? PyList_GET_SIZE(column) : -1;
        for (Py_ssize_t j = 0; taken != NULL && j < n; j++) {
            if (at[j] < 0 || at[j] >= size) {
                Py_CLEAR(taken);
                break;
            }
            PyObject *item = PyList_GET_ITEM(column, at[j]);
            Py_INCREF(item);
            PyList_SET_ITEM(taken, j, item);
        }
        if (taken == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_ValueError, "take(): a column is no list, or an index is outside it");
            }
            Py_CLEAR(out);
            break;
        }
        PyTuple_SET_ITEM(out, i, taken);
    }
    PyMem_Free(at);
    return out;
}

static PyMethodDef methods[] = {
    {"claim_walk", (PyCFunction)(void (*)(void))claim_walk, METH_FASTCALL,
     "claim_walk(leases, t, runs, context, node_labels, places, place_of_node, proposer,\n"
     "           first_slots, first_slot, active, spare)\n"
     "--\n\n"
     "``matching._walk`` in C: the same result, equal element by element."},
    {"gather", (PyCFunction)(void (*)(void))gather, METH_FASTCALL,
     "gather(rows, starts, ends)\n--\n\n``matching._gather`` in C."},
    {"take", (PyCFunction)(void (*)(void))take, METH_FASTCALL,
     "take(columns, order)\n--\n\n``matching._take`` in C."},
    {"match_core", (PyCFunction)(void (*)(void))match_core, METH_FASTCALL,
     "match_core(n, *arrays, full, lent, borrow_limit, cap_full, limited, any_borrow_cap)\n"
     "--\n\n"
     "``matching._match``'s deferred acceptance over integer arrays (``matching._match_native``)."},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "gpu_fleet.core.funding._native",
    "The funding matching's hot loops in C; the functions of ``matching`` are the reference.",
    0,
    methods,
    slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModuleDef_Init(&module);
}
