/* The Python module: argument parsing and checks, the GIL released around the work.
 * Weights and caches arrive as addresses of live tensors (the caller keeps them alive). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdlib.h>

#include "engine.h"

#define CAPSULE "edgepack.runtime.engine._engine.Model"

static void *as_ptr(PyObject *o) { return o == Py_None ? NULL : PyLong_AsVoidPtr(o); }

/* The int8 products take |x| and give w x's sign (dot_q8, arch/x86/avx2.c): -128 has no
 * negation in int8, so a code of -128 would be read as +128 wherever x < 0. edgepack's packer
 * writes codes in [-127, 127], as bitsandbytes does; one outside came from elsewhere. One
 * pass over the int8 weights at load, which the compiler vectorises: 0.1 s for 1.25 GB. */
#define CODE_RANGE_ERROR "int8 weight code -128: the kernels take codes in [-127, 127], as edgepack's packer writes them"
static int codes_in_range(const Mat *m) {
    if (m->type != W_INT8 && m->type != W_INT8_B32) return 1;
    const uint8_t *p = m->w;
    const size_t n = (size_t)m->rows * m->cols;
    uint8_t bad = 0;
    for (size_t i = 0; i < n; i++) bad |= p[i] == 0x80;
    return !bad;
}

static int check_mat(const Mat *m) {
    if (PyErr_Occurred()) return -1;
    const int int4_ok = m->group >= 32 && m->group % 32 == 0 && m->cols % m->group == 0 && m->sz;
    if (m->type < W_INT8 || m->type > W_INT8_B32 || !m->w || m->rows <= 0 || m->cols <= 0 ||
        (m->type == W_INT8 && !m->scale) || (m->type == W_INT4 && !int4_ok) ||
        (m->type == W_INT8_B32 && (m->cols % 32 || !m->sz))) {
        PyErr_SetString(PyExc_ValueError, "bad matrix description");
        return -1;
    }
    return 0;
}

/* (type, rows, cols, weight, scale, bias[, group]): int4's `scale` is its (scale, zero) pairs,
 * INT8_B32's its float16 block scales */
static int set_mat(Mat *m, PyObject *w, PyObject *s, PyObject *b) {
    m->w = as_ptr(w), m->bias = as_ptr(b);
    m->scale = NULL, m->sz = NULL;
    if (m->type == W_INT4 || m->type == W_INT8_B32)
        m->sz = as_ptr(s);
    else
        m->scale = as_ptr(s);
    return check_mat(m);
}

static int parse_mat(PyObject *t, Mat *m) {
    PyObject *w, *s, *b;
    m->group = 0;
    if (!PyArg_ParseTuple(t, "iiiOOO|i", &m->type, &m->rows, &m->cols, &w, &s, &b, &m->group)) return -1;
    return set_mat(m, w, s, b);
}

/* a model's matrix: parse_mat's checks and the codes' range (gemv, for tests and benchmarks,
 * takes codes as given: a scan a call would be most of its time) */
static int model_mat(PyObject *t, Mat *m) {
    if (parse_mat(t, m)) return -1;
    if (!codes_in_range(m)) {
        PyErr_SetString(PyExc_ValueError, CODE_RANGE_ERROR);
        return -1;
    }
    return 0;
}

static void free_model(Model *m) {
    if (!m) return;
    free(m->layers);
    free(m->x);
    free(m->prep);
    free(m->scores);
    free(m->inv_freq);
    free(m->rope);
    free(m->sliding_before);
    free(m);
}

static void capsule_free(PyObject *cap) { free_model((Model *)PyCapsule_GetPointer(cap, CAPSULE)); }

/* new(dims, eps, (embed_type, embed[, embed_rows]), norm, head, layers[, features])
 *   embed_rows: an int8 table's float32 scale of each row (required for INT8, else None), or
 *   its float16 scale of each block of 32 ([vocab, hidden / 32], required for INT8_B32)
 *   dims = (hidden, heads, kv_heads, head_dim, inter, vocab)
 *   head / a layer's matrices = (type, rows, cols, weight, scale or None, bias or None)
 *   layers = [(in_norm, post_norm, qkv, o, gate_up, down[, q_norm, k_norm, attn_out_norm,
 *              mlp_out_norm, rope, sliding]), ...]: norms are addresses or None, rope the
 *              table the layer uses (-1: none), sliding 1 for a sliding-window layer
 *   features = (embed_scale, attn_scale, attn_softcap, final_softcap, act, window, n_ropes,
 *               rot_dim, rope_mult, long_from, inv_freq): inv_freq the address of n_ropes x
 *              rot_dim / 2 float32 (twice that where long_from > 0: the long set after; copied);
 *              rot_dim 0: head_dim; n_ropes 0: the one table forward() makes from its
 *              rope_theta (engine.h, Model) */
static int parse_features(PyObject *t, Model *m) {
    PyObject *freqs;
    m->embed_scale = 1.f, m->rope_mult = 1.f, m->rot_dim = m->head_dim;
    if (!t) return 0;
    if (!PyArg_ParseTuple(t, "ffffiiiifiO", &m->embed_scale, &m->attn_scale, &m->attn_softcap, &m->final_softcap,
                          &m->act, &m->window, &m->n_ropes, &m->rot_dim, &m->rope_mult, &m->long_from, &freqs))
        return -1;
    const float *inv = as_ptr(freqs);
    if (PyErr_Occurred()) return -1;
    m->rot_dim = m->rot_dim ? m->rot_dim : m->head_dim;
    if (!(m->embed_scale > 0.f) || m->attn_scale < 0.f || m->attn_softcap < 0.f || m->final_softcap < 0.f ||
        (m->act != ACT_SILU && m->act != ACT_GELU_TANH) || m->window < 0 || m->n_ropes < 0 || m->n_ropes > 16 ||
        (m->n_ropes && !inv) || m->rot_dim < 2 || m->rot_dim > m->head_dim || m->rot_dim % 2 ||
        !(m->rope_mult > 0.f) || m->long_from < 0 || (m->n_ropes == 0 && (m->rot_dim != m->head_dim || m->long_from))) {
        PyErr_SetString(PyExc_ValueError, "bad model features");
        return -1;
    }
    if (!m->n_ropes) return 0;
    const size_t half = (size_t)m->n_ropes * m->rot_dim / 2 * (m->long_from ? 2 : 1);
    m->inv_freq = malloc(half * sizeof(float));
    m->rope = malloc((size_t)m->n_ropes * 2 * m->head_dim * sizeof(float));
    if (!m->inv_freq || !m->rope) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(m->inv_freq, inv, half * sizeof(float));
    return 0;
}

/* a layer's features after its six required items (see new()) */
static int parse_layer_features(PyObject *t, Model *m, Layer *L, int i) {
    PyObject *qn = Py_None, *kn = Py_None, *an = Py_None, *mn = Py_None;
    L->rope = 0, L->sliding = 0;
    if (PyTuple_GET_SIZE(t) <= 6) return 0;
    PyObject *rest = PyTuple_GetSlice(t, 6, PyTuple_GET_SIZE(t));
    if (!rest) return -1;
    const int ok = PyArg_ParseTuple(rest, "OOOOii", &qn, &kn, &an, &mn, &L->rope, &L->sliding);
    Py_DECREF(rest);
    if (!ok) return -1;
    L->q_norm = as_ptr(qn), L->k_norm = as_ptr(kn), L->attn_out_norm = as_ptr(an), L->mlp_out_norm = as_ptr(mn);
    if (PyErr_Occurred()) return -1;
    const int tables = m->n_ropes ? m->n_ropes : 1;
    if (!L->q_norm != !L->k_norm || L->rope < -1 || L->rope >= tables || (L->sliding && m->window <= 0)) {
        PyErr_Format(PyExc_ValueError, "layer %d: bad features", i);
        return -1;
    }
    L->sliding = L->sliding != 0;
    m->n_sliding += L->sliding;
    return 0;
}

static PyObject *py_new(PyObject *self, PyObject *args) {
    int hidden, heads, kv_heads, head_dim, inter, vocab, embed_type;
    float eps;
    PyObject *table, *embed, *embed_rows = Py_None, *norm, *head, *layers, *features = NULL;
    if (!PyArg_ParseTuple(args, "(iiiiii)fO!OOO|O", &hidden, &heads, &kv_heads, &head_dim, &inter, &vocab, &eps,
                          &PyTuple_Type, &table, &norm, &head, &layers, &features) ||
        !PyArg_ParseTuple(table, "iO|O", &embed_type, &embed, &embed_rows))
        return NULL;
    if (hidden <= 0 || heads <= 0 || kv_heads <= 0 || heads % kv_heads || head_dim <= 0 || head_dim % 2 || inter <= 0 ||
        vocab <= 0 || embed_type < W_INT8 || (embed_type > W_F32 && embed_type != W_INT8_B32) ||
        (embed_type == W_INT8 || embed_type == W_INT8_B32) != (embed_rows != Py_None) ||
        (embed_type == W_INT8_B32 && hidden % 32)) {
        PyErr_SetString(PyExc_ValueError, "bad model dimensions");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(layers, "layers must be a sequence");
    if (!seq) return NULL;
    Model *m = calloc(1, sizeof(Model));
    if (!m) goto nomem;
    m->hidden = hidden, m->heads = heads, m->kv_heads = kv_heads, m->head_dim = head_dim, m->inter = inter;
    m->vocab = vocab, m->eps = eps, m->embed_type = embed_type;
    m->n_layers = (int)PySequence_Fast_GET_SIZE(seq);
    m->embed = as_ptr(embed), m->norm = as_ptr(norm);
    if (embed_type == W_INT8_B32)
        m->embed_b32 = as_ptr(embed_rows);
    else
        m->embed_rows = as_ptr(embed_rows);
    if (PyErr_Occurred() || model_mat(head, &m->head)) goto fail;
    m->layers = calloc(m->n_layers ? m->n_layers : 1, sizeof(Layer));
    const int qkv = (heads + 2 * kv_heads) * head_dim;
    const size_t floats = (size_t)hidden * 2 + qkv + (size_t)heads * head_dim + 2 * (size_t)inter +
                          ((size_t)hidden + inter);
    m->x = malloc(floats * sizeof(float));
    const int widest = hidden > inter ? (hidden > heads * head_dim ? hidden : heads * head_dim)
                                      : (inter > heads * head_dim ? inter : heads * head_dim);
    m->prep = malloc(((size_t)widest + widest / 32 + 1) * sizeof(float));
    if (!m->layers || !m->x || !m->prep) goto nomem;
    m->h = m->x + hidden, m->qkv = m->h + hidden, m->att = m->qkv + qkv, m->gu = m->att + (size_t)heads * head_dim;
    m->tmp = m->gu + 2 * (size_t)inter;
    if (parse_features(features, m)) goto fail;
    for (int i = 0; i < m->n_layers; i++) {
        Layer *L = &m->layers[i];
        PyObject *in_norm, *post_norm, *a, *b, *c, *d, *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) < 6) {
            PyErr_Format(PyExc_TypeError, "layer %d: a tuple of 6 or 12 items was expected", i);
            goto fail;
        }
        PyObject *six = PyTuple_GetSlice(item, 0, 6);
        const int parsed = six && PyArg_ParseTuple(six, "OOOOOO", &in_norm, &post_norm, &a, &b, &c, &d);
        Py_XDECREF(six);
        if (!parsed || parse_layer_features(item, m, L, i)) goto fail;
        L->in_norm = as_ptr(in_norm), L->post_norm = as_ptr(post_norm);
        if (PyErr_Occurred() || model_mat(a, &L->qkv) || model_mat(b, &L->o) || model_mat(c, &L->gate_up) ||
            model_mat(d, &L->down))
            goto fail;
        if (L->qkv.rows != qkv || L->qkv.cols != hidden || L->o.rows != hidden || L->o.cols != heads * head_dim ||
            L->gate_up.rows != 2 * inter || L->gate_up.cols != hidden || L->down.rows != hidden || L->down.cols != inter) {
            PyErr_Format(PyExc_ValueError, "layer %d: matrix shapes do not match the model's dimensions", i);
            goto fail;
        }
    }
    if (m->n_sliding) {
        m->sliding_before = malloc((size_t)m->n_layers * sizeof(int));
        if (!m->sliding_before) goto nomem;
        for (int i = 0, below = 0; i < m->n_layers; below += m->layers[i++].sliding) m->sliding_before[i] = below;
    }
    if (m->head.rows != vocab || m->head.cols != hidden || !m->embed || !m->norm) {
        PyErr_SetString(PyExc_ValueError, "head, embedding or norm do not match the model's dimensions");
        goto fail;
    }
    Py_DECREF(seq);
    PyObject *cap = PyCapsule_New(m, CAPSULE, capsule_free);
    if (!cap) free_model(m);
    return cap;
nomem:
    PyErr_NoMemory();
fail:
    Py_DECREF(seq);
    free_model(m);
    return NULL;
}

/* step(model, token, pos, k_cache, v_cache, max_tokens, cos, sin, logits, threads) */
static PyObject *py_step(PyObject *self, PyObject *args) {
    PyObject *cap, *kc, *vc, *cos, *sin, *logits;
    int token, pos, max_tokens, threads;
    if (!PyArg_ParseTuple(args, "OiiOOiOOOi", &cap, &token, &pos, &kc, &vc, &max_tokens, &cos, &sin, &logits, &threads))
        return NULL;
    Model *m = (Model *)PyCapsule_GetPointer(cap, CAPSULE);
    if (!m) return NULL;
    void *k = as_ptr(kc), *v = as_ptr(vc), *c = as_ptr(cos), *s = as_ptr(sin), *out = as_ptr(logits);
    if (PyErr_Occurred()) return NULL;
    if (token < 0 || token >= m->vocab || pos < 0 || pos >= max_tokens || !k || !v || !c || !s || !out) {
        PyErr_Format(PyExc_ValueError, "token %d at position %d is outside the model (vocab %d) or cache (%d)", token, pos,
                     m->vocab, max_tokens);
        return NULL;
    }
    threads = threads < 1 ? 1 : threads;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&step_lock); /* one step at a time: the pool and a model's scratch are shared */
    ok = grow_scores(m, max_tokens, threads);
    ensure_workers(threads - 1);
    if (ok)
        run_step(m, token, pos, (uint16_t *)k, (uint16_t *)v, max_tokens, (const float *)c, (const float *)s, (float *)out,
             threads);
    pthread_mutex_unlock(&step_lock);
    Py_END_ALLOW_THREADS
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* forward(model, tokens, pos, k_cache, v_cache, max_tokens, rope_theta, logits, threads[, adapt]):
 * the tokens (a sequence of ints) at positions pos.. written into the KV cache, the last one's
 * logits into `logits`. One token is a decode step (run_step), more a prompt (run_prompt).
 * adapt: a decode step runs on the thread count, at most `threads`, measured fastest (pool.c). */
static PyObject *py_forward(PyObject *self, PyObject *args) {
    PyObject *cap, *seq_in, *kc, *vc, *logits;
    int pos, max_tokens, threads, adapt = 0;
    float theta;
    if (!PyArg_ParseTuple(args, "OOiOOifOi|p", &cap, &seq_in, &pos, &kc, &vc, &max_tokens, &theta, &logits, &threads,
                          &adapt))
        return NULL;
    Model *m = (Model *)PyCapsule_GetPointer(cap, CAPSULE);
    if (!m) return NULL;
    void *k = as_ptr(kc), *v = as_ptr(vc), *out = as_ptr(logits);
    if (PyErr_Occurred()) return NULL;
    PyObject *seq = PySequence_Fast(seq_in, "tokens must be a sequence of ints");
    if (!seq) return NULL;
    const Py_ssize_t T = PySequence_Fast_GET_SIZE(seq);
    if (T < 1 || pos < 0 || pos + T > max_tokens || !k || !v || !out || !(theta > 0.f)) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "%zd tokens at position %d do not fit a cache of %d", T, pos, max_tokens);
        return NULL;
    }
    int *tokens = malloc((size_t)T * sizeof(int));
    if (!tokens) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < T; i++) {
        const long t = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if ((t == -1 && PyErr_Occurred()) || t < 0 || t >= m->vocab) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "token %ld is outside the vocabulary (%d)", t, m->vocab);
            free(tokens);
            Py_DECREF(seq);
            return NULL;
        }
        tokens[i] = (int)t;
    }
    Py_DECREF(seq);
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&step_lock);
    const int running = ensure_workers(threads - 1); /* this caller + the workers there are */
    threads = running < threads ? running : threads;
    if (T == 1) {
        float rope[2 * 512];
        ok = grow_scores(m, max_tokens, threads) && m->head_dim <= 512;
        if (ok) {
            rope_tables(theta, m->head_dim, pos, rope, rope + m->head_dim);
            const int nth = adapt ? adapt_threads(threads) : threads;
            const double t0 = pool_now();
            run_step(m, tokens[0], pos, (uint16_t *)k, (uint16_t *)v, max_tokens, rope, rope + m->head_dim, (float *)out,
                     nth);
            if (adapt) adapt_record(nth, pool_now() - t0);
        }
    } else {
        PromptScratch s;
        ok = prompt_scratch(m, threads, max_tokens, &s) == 0;
        if (ok) {
            run_prompt(m, tokens, (int)T, pos, (uint16_t *)k, (uint16_t *)v, max_tokens, theta, (float *)out, threads, &s);
            free(s.x);
        }
    }
    pthread_mutex_unlock(&step_lock);
    Py_END_ALLOW_THREADS
    free(tokens);
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* step_batch(model, steps, rope_theta, threads[, adapt]): one decode step of each sequence in
 * `steps`, a sequence of (token, pos, k_cache, v_cache, max_tokens, logits) (batch.c); adapt:
 * on the thread count measured fastest for batched steps of as many sequences (pool.c). One
 * record per batch size: a step of four costs less per sequence than a step of one, and with
 * one record the steps of a batch filling up read as a thread count's cost, which kept
 * `edgepack serve` on one thread for 4 streams (1.09x one at a time, 1.30x on two threads). */
#define BATCH_ADAPTS 8
static Adapt batch_adapt[BATCH_ADAPTS]; /* [B - 1], the last for B >= BATCH_ADAPTS */

static PyObject *py_step_batch(PyObject *self, PyObject *args) {
    PyObject *cap, *list;
    float theta;
    int threads, adapt = 0;
    if (!PyArg_ParseTuple(args, "OOfi|p", &cap, &list, &theta, &threads, &adapt)) return NULL;
    Model *m = (Model *)PyCapsule_GetPointer(cap, CAPSULE);
    if (!m) return NULL;
    PyObject *seq = PySequence_Fast(list, "steps must be a sequence of tuples");
    if (!seq) return NULL;
    const Py_ssize_t B = PySequence_Fast_GET_SIZE(seq);
    BatchSeq *seqs = calloc(B ? (size_t)B : 1, sizeof(BatchSeq));
    if (!seqs) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < B; i++) {
        BatchSeq *q = &seqs[i];
        PyObject *kc, *vc, *out;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iiOOiO", &q->token, &q->pos, &kc, &vc, &q->max_tokens, &out))
            goto fail;
        q->kc = as_ptr(kc), q->vc = as_ptr(vc), q->logits = as_ptr(out);
        if (PyErr_Occurred()) goto fail;
        if (q->token < 0 || q->token >= m->vocab || q->pos < 0 || q->pos >= q->max_tokens || !q->kc || !q->vc || !q->logits) {
            PyErr_Format(PyExc_ValueError, "step %zd: token %d at position %d is outside the model (vocab %d) or cache (%d)",
                         i, q->token, q->pos, m->vocab, q->max_tokens);
            goto fail;
        }
    }
    Py_DECREF(seq);
    if (!(theta > 0.f) || m->head_dim > 512) {
        free(seqs);
        PyErr_SetString(PyExc_ValueError, "step_batch: bad rope_theta or head_dim");
        return NULL;
    }
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&step_lock);
    const int running = ensure_workers(threads - 1);
    threads = running < threads ? running : threads;
    if (B > 0) {
        Adapt *a = &batch_adapt[B < BATCH_ADAPTS ? B - 1 : BATCH_ADAPTS - 1];
        const int nth = adapt ? adapt_threads_of(a, threads) : threads;
        const double t0 = pool_now();
        ok = run_steps(m, seqs, (int)B, theta, nth) == 0;
        if (adapt && ok) adapt_record_of(a, nth, pool_now() - t0);
    }
    pthread_mutex_unlock(&step_lock);
    Py_END_ALLOW_THREADS
    free(seqs);
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
fail:
    Py_DECREF(seq);
    free(seqs);
    return NULL;
}

/* address(buffer): where a buffer's bytes are (the caller keeps the object alive) */
static PyObject *py_address(PyObject *self, PyObject *obj) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return NULL;
    void *p = view.buf;
    PyBuffer_Release(&view);
    return PyLong_FromVoidPtr(p);
}

/* convert(src, src_type, dst, dst_type, n[, divisor]): n values between BF16/F16/F32 (in
 * place when the sizes agree), each divided by divisor; False, with nothing written, when
 * a value is too large for float16 */
static PyObject *py_convert(PyObject *self, PyObject *args) {
    PyObject *src, *dst;
    int st, dt;
    Py_ssize_t n;
    float divisor = 1.f;
    if (!PyArg_ParseTuple(args, "OiOin|f", &src, &st, &dst, &dt, &n, &divisor)) return NULL;
    const void *s = as_ptr(src);
    void *d = as_ptr(dst);
    if (PyErr_Occurred()) return NULL;
    if (!s || !d || n < 0 || st < W_BF16 || st > W_F32 || dt < W_BF16 || dt > W_F32) {
        PyErr_SetString(PyExc_ValueError, "convert: bad arguments");
        return NULL;
    }
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS
    if (dt == W_F16) ok = fits_f16(s, st, (size_t)n, divisor); /* too large for float16 anywhere: write nothing */
    if (ok) convert_values(s, st, d, dt, (size_t)n, divisor);
    Py_END_ALLOW_THREADS
    if (!ok) Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

/* transpose32(src, rows, cols, dst): dst[c, r] = src[r, c] for 32-bit items */
static PyObject *py_transpose32(PyObject *self, PyObject *args) {
    PyObject *src, *dst;
    Py_ssize_t rows, cols;
    if (!PyArg_ParseTuple(args, "OnnO", &src, &rows, &cols, &dst)) return NULL;
    const uint32_t *s = as_ptr(src);
    uint32_t *d = as_ptr(dst);
    if (PyErr_Occurred()) return NULL;
    if (!s || !d || rows < 0 || cols < 0) {
        PyErr_SetString(PyExc_ValueError, "transpose32: bad arguments");
        return NULL;
    }
    transpose32(s, (size_t)rows, (size_t)cols, d);
    Py_RETURN_NONE;
}

/* sample(logits, n, temperature, top_k, top_p, u): a token drawn from the logits (sample.c) */
static PyObject *py_sample(PyObject *self, PyObject *args) {
    PyObject *p;
    Py_ssize_t n;
    float temperature, top_p;
    int top_k;
    double u;
    if (!PyArg_ParseTuple(args, "Onfifd", &p, &n, &temperature, &top_k, &top_p, &u)) return NULL;
    const float *logits = as_ptr(p);
    if (PyErr_Occurred()) return NULL;
    if (!logits || n <= 0 || !(temperature > 0.f) || top_k < 0 || !(top_p > 0.f && top_p <= 1.f)) {
        PyErr_SetString(PyExc_ValueError, "sample: bad arguments");
        return NULL;
    }
    const int token = sample(logits, (size_t)n, temperature, top_k, top_p, u);
    if (token == SAMPLE_NOMEM) return PyErr_NoMemory();
    if (token == SAMPLE_EMPTY) {
        PyErr_SetString(PyExc_ValueError, "sample: no token has a finite logit");
        return NULL;
    }
    return PyLong_FromLong(token);
}

/* a task on `threads` threads from Python: the GIL released, one caller of the pool at a time */
static void parallel_without_gil(task_fn task, void *ctx, int rows, int threads) {
    threads = threads < 1 ? 1 : threads;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&step_lock);
    ensure_workers(threads - 1);
    parallel_rows(task, ctx, rows, 4, threads);
    pthread_mutex_unlock(&step_lock);
    Py_END_ALLOW_THREADS
}

/* gemv(matrix, x, y, threads): y = W x with the step's kernels (tests, benchmarks); matrix as
 * in new() */
static PyObject *py_gemv(PyObject *self, PyObject *args) {
    Mat mat;
    PyObject *t, *x, *y;
    int threads;
    if (!PyArg_ParseTuple(args, "OOOi", &t, &x, &y, &threads) || parse_mat(t, &mat)) return NULL;
    float *xp = as_ptr(x), *yp = as_ptr(y);
    if (PyErr_Occurred()) return NULL;
    if (!xp || !yp) {
        PyErr_SetString(PyExc_ValueError, "bad matrix description");
        return NULL;
    }
    float *prep = NULL;
    if (mat.type == W_INT4 || mat.type == W_INT8 || mat.type == W_INT8_B32) {
        prep = malloc(((size_t)mat.cols + mat.cols / 32 + 1) * sizeof(float));
        if (!prep) return PyErr_NoMemory();
        if (mat.type == W_INT4)
            prep_int4(&mat, xp, prep);
        else if (!prep_q8(&mat, xp, prep))
            free(prep), prep = NULL;
    }
    Job j = {.mat = &mat, .in = xp, .prep = prep, .out = yp, .add = 0};
    parallel_without_gil(task_mat, &j, mat.rows, threads);
    free(prep);
    Py_RETURN_NONE;
}

/* dequant_int4(codes, pairs, rows, cols, group, out, threads): float32 [rows, cols] weights of
 * an int4 matrix (the prompt path multiplies them in float32 GEMMs) */
typedef struct {
    const Mat *mat;
    float *out;
} Dequant;

static void task_dequant(void *ctx, int tid, int nth) {
    const Dequant *d = (const Dequant *)ctx;
    int lo, hi;
    while (take_rows(tid, nth, &lo, &hi)) int4_rows_f32(d->mat, lo, hi, d->out + (size_t)lo * d->mat->cols);
}

static PyObject *py_dequant_int4(PyObject *self, PyObject *args) {
    Mat mat = {.type = W_INT4};
    PyObject *w, *s, *o;
    int threads;
    if (!PyArg_ParseTuple(args, "OOiiiOi", &w, &s, &mat.rows, &mat.cols, &mat.group, &o, &threads) ||
        set_mat(&mat, w, s, Py_None))
        return NULL;
    Dequant d = {&mat, as_ptr(o)};
    if (PyErr_Occurred()) return NULL;
    if (!d.out) {
        PyErr_SetString(PyExc_ValueError, "bad matrix description");
        return NULL;
    }
    parallel_without_gil(task_dequant, &d, mat.rows, threads);
    Py_RETURN_NONE;
}

/* argmax(values, n): the index of the first largest of n float32 values (sample.c) */
static PyObject *py_argmax(PyObject *self, PyObject *args) {
    PyObject *p;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "On", &p, &n)) return NULL;
    const float *v = as_ptr(p);
    if (PyErr_Occurred()) return NULL;
    if (!v || n <= 0) {
        PyErr_SetString(PyExc_ValueError, "argmax of nothing");
        return NULL;
    }
    return PyLong_FromSize_t(argmax(v, (size_t)n));
}

/* profile(on=None): {part: seconds} summed over the steps since the clock was turned on,
 * plus "steps"; on=True/False turns it on (and resets) / off */
static PyObject *py_profile(PyObject *self, PyObject *args) {
    PyObject *on = Py_None;
    if (!PyArg_ParseTuple(args, "|O", &on)) return NULL;
    PyObject *out = PyDict_New();
    if (!out) return NULL;
    for (int i = 0; i < P_PARTS; i++) {
        PyObject *v = PyFloat_FromDouble(part_seconds[i]);
        if (!v || PyDict_SetItemString(out, PART_NAMES[i], v)) {
            Py_XDECREF(v);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(v);
    }
    PyObject *steps = PyLong_FromLong(profiled_steps);
    if (!steps || PyDict_SetItemString(out, "steps", steps)) {
        Py_XDECREF(steps);
        Py_DECREF(out);
        return NULL;
    }
    Py_DECREF(steps);
    /* the pool's counts ride along as {"sync": {name: count, ..., "wait seconds": s}} */
    PyObject *sync = PyDict_New();
    int bad = !sync;
    for (int i = 0; !bad && i < S_COUNTS; i++) {
        PyObject *v = PyLong_FromLong(sync_counts[i]);
        bad = !v || PyDict_SetItemString(sync, SYNC_NAMES[i], v);
        Py_XDECREF(v);
    }
    if (!bad) {
        PyObject *v = PyFloat_FromDouble(sync_wait_seconds);
        bad = !v || PyDict_SetItemString(sync, "wait seconds", v);
        Py_XDECREF(v);
    }
    if (bad || PyDict_SetItemString(out, "sync", sync)) {
        Py_XDECREF(sync);
        Py_DECREF(out);
        return NULL;
    }
    Py_DECREF(sync);
    if (on != Py_None) {
        pthread_mutex_lock(&step_lock);
        profiling = PyObject_IsTrue(on);
        memset(part_seconds, 0, sizeof part_seconds);
        memset(sync_counts, 0, sizeof sync_counts);
        sync_wait_seconds = 0.0;
        profiled_steps = 0;
        pthread_mutex_unlock(&step_lock);
    }
    return out;
}
/* set_isa(name=None): kernels to use from now on ('generic', 'avx2', 'avx512', no better
 * than this CPU's); returns the previous name */
static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name = NULL;
    if (!PyArg_ParseTuple(args, "|z", &name)) return NULL;
    const char *previous = current_isa();
    if (name && set_isa(name) < 0) {
        PyErr_Format(PyExc_ValueError, "instruction set %s is not available here (best: %s)", name, best_isa());
        return NULL;
    }
    return PyUnicode_FromString(previous);
}

/* activation_bits(bits=None): 32 or 8, the activations into int8 matrix-vector products of
 * decode steps from now on (engine.h, act_bits); returns the previous */
static PyObject *py_activation_bits(PyObject *self, PyObject *args) {
    int bits = 0;
    if (!PyArg_ParseTuple(args, "|i", &bits)) return NULL;
    const int previous = act_bits;
    if (bits && bits != 8 && bits != 32) {
        PyErr_Format(PyExc_ValueError, "activation bits %d: 32 (float32) or 8 (int8 per block of 32) expected", bits);
        return NULL;
    }
    if (bits) {
        pthread_mutex_lock(&step_lock);
        act_bits = bits;
        pthread_mutex_unlock(&step_lock);
    }
    return PyLong_FromLong(previous);
}

/* int8_activations(): whether decode steps round int8 products' inputs to int8 now (act_bits 8
 * and a kernel set with int8_q8; bundles without int8 matrices take float32 regardless) */
static PyObject *py_int8_activations(PyObject *self, PyObject *noargs) {
    return PyBool_FromLong(act_bits == 8 && kernels->int8_q8 != NULL);
}

/* threads_in_use(): the thread count adaptive decode steps run on now (0 before the first) */
static PyObject *py_threads_in_use(PyObject *self, PyObject *noargs) { return PyLong_FromLong(adapt_current()); }

/* adapt_trace(most, times): the thread counts the step picker (pool.c) gives a run of steps
 * whose time with n threads is times[i][n - 1] (tests: its policy without a clock) */
static PyObject *py_adapt_trace(PyObject *self, PyObject *args) {
    int most;
    PyObject *times;
    if (!PyArg_ParseTuple(args, "iO!", &most, &PyList_Type, &times)) return NULL;
    if (most < 1 || most > MAX_THREADS) {
        PyErr_SetString(PyExc_ValueError, "adapt_trace: most must be 1..MAX_THREADS");
        return NULL;
    }
    Adapt a = {0};
    const Py_ssize_t n = PyList_GET_SIZE(times);
    PyObject *out = PyList_New(n);
    if (!out) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        const int nth = adapt_threads_of(&a, most);
        PyObject *row = PyList_GET_ITEM(times, i);
        const double t = PyList_Check(row) && PyList_GET_SIZE(row) == most ? PyFloat_AsDouble(PyList_GET_ITEM(row, nth - 1)) : -1.0;
        if (PyErr_Occurred() || t < 0.0) {
            Py_DECREF(out);
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "adapt_trace: each step needs `most` times >= 0");
            return NULL;
        }
        adapt_record_of(&a, nth, t);
        PyList_SET_ITEM(out, i, PyLong_FromLong(nth));
    }
    return out;
}

static PyMethodDef methods[] = {
    {"threads_in_use", py_threads_in_use, METH_NOARGS, "Threads adaptive decode steps run on now."},
    {"adapt_trace", py_adapt_trace, METH_VARARGS, "The thread counts the step picker gives steps of given times."},
    {"new", py_new, METH_VARARGS, "Describe a model to the step kernel (pointers into live tensors)."},
    {"step", py_step, METH_VARARGS, "One decode step: writes the KV cache at pos and the logits."},
    {"step_batch", py_step_batch, METH_VARARGS, "One decode step of each of several sequences, weights read once."},
    {"forward", py_forward, METH_VARARGS, "Tokens through the model (a prompt or one step): KV cache and last logits."},
    {"sample", py_sample, METH_VARARGS, "A token drawn from logits with temperature, top-k and top-p."},
    {"address", py_address, METH_O, "Where a buffer's bytes are."},
    {"convert", py_convert, METH_VARARGS, "Values between bfloat16, float16 and float32."},
    {"transpose32", py_transpose32, METH_VARARGS, "Transpose a matrix of 32-bit items."},
    {"gemv", py_gemv, METH_VARARGS, "y = W x with the step's kernels."},
    {"dequant_int4", py_dequant_int4, METH_VARARGS, "float32 weights of an int4 matrix."},
    {"argmax", py_argmax, METH_VARARGS, "Index of the largest float32 value."},
    {"profile", py_profile, METH_VARARGS, "Seconds per part of the step: profile(True) starts, profile() reads."},
    {"set_isa", py_set_isa, METH_VARARGS, "Kernels to use ('generic', 'avx2', 'avx512'); returns the previous."},
    {"int8_activations", py_int8_activations, METH_NOARGS, "Whether int8 products take int8 inputs now."},
    {"activation_bits", py_activation_bits, METH_VARARGS, "Activations into int8 products: 32 or 8; returns the previous."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_engine", NULL, -1, methods};

PyMODINIT_FUNC PyInit__engine(void) {
    detect_isa();
    pthread_atfork(NULL, NULL, pool_after_fork);
    PyObject *mod = PyModule_Create(&module);
    if (mod) {
        PyModule_AddIntConstant(mod, "INT8", W_INT8);
        PyModule_AddIntConstant(mod, "BF16", W_BF16);
        PyModule_AddIntConstant(mod, "F16", W_F16);
        PyModule_AddIntConstant(mod, "F32", W_F32);
        PyModule_AddIntConstant(mod, "INT4", W_INT4);
        PyModule_AddIntConstant(mod, "INT8_B32", W_INT8_B32);
        PyModule_AddIntConstant(mod, "MAX_THREADS", MAX_THREADS);
        PyModule_AddIntConstant(mod, "PROMPT_CHUNK", CHUNK); /* the planner mirrors these two */
        PyModule_AddIntConstant(mod, "PROMPT_ROWS", PB);
    }
    return mod;
}
