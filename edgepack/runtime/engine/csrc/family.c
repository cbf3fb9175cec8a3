/* What families other than Llama add to a layer (the Model's and Layer's feature fields):
 * rotary tables from per-frequency inverse frequencies (Llama 3's scaling, two bases in
 * Gemma 3), RMSNorm of each q / k head (Qwen3, Gemma 3), GeGLU with tanh-GELU and
 * soft-capped attention scores and logits (Gemma 2), norms of the attention's and MLP's
 * outputs (Gemma), rotary over part of each head and longrope's two sets of tables (Phi-3,
 * Phi-4-mini). Scalar code: these run once per token and head, not per weight. */
#include "engine.h"

/* cos | sin of the first R dims of a head at position pos, each times mult */
void rope_from_freqs(const float *inv_freq, int R, int pos, float mult, float *cos, float *sin) {
    const int half = R / 2;
    for (int i = 0; i < half; i++) {
        const float f = (float)pos * inv_freq[i]; /* float32, as transformers' freqs = inv_freq @ positions */
        cos[i] = cos[i + half] = cosf(f) * mult;
        sin[i] = sin[i + half] = sinf(f) * mult;
    }
}

const float *rope_set(const Model *m, int last) {
    const int far = m->long_from > 0 && last >= m->long_from;
    return m->inv_freq + (far ? (size_t)m->n_ropes * m->rot_dim / 2 : 0);
}

void model_rope(Model *m, int pos, int last, float *cos, float *sin) {
    const int D = m->head_dim, R = m->rot_dim;
    const float *set = rope_set(m, last);
    for (int r = 0; r < m->n_ropes; r++)
        rope_from_freqs(set + (size_t)r * R / 2, R, pos, m->rope_mult, cos + (size_t)r * 2 * D, sin + (size_t)r * 2 * D);
}

/* q heads then k heads of one token's q/k/v row, each normalized over head_dim */
void qk_norm(const Model *m, const Layer *L, float *qkv) {
    const int D = m->head_dim;
    for (int h = 0; h < m->heads; h++) rms_norm(qkv + (size_t)h * D, L->q_norm, qkv + (size_t)h * D, D, m->eps);
    float *k = qkv + (size_t)m->heads * D;
    for (int g = 0; g < m->kv_heads; g++) rms_norm(k + (size_t)g * D, L->k_norm, k + (size_t)g * D, D, m->eps);
}

/* gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), tanh(u) = 1 - 2 / (e^2u + 1) */
static void gelu_tanh_mul(const float *gate, const float *up, float *out, int n) {
#pragma omp simd
    for (int r = 0; r < n; r++) {
        const float x = gate[r], u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        const float t = 1.f - 2.f / (ep_exp(2.f * u) + 1.f);
        out[r] = 0.5f * x * (1.f + t) * up[r];
    }
}

void act_mul(const Model *m, const float *gate, const float *up, float *out, int n) {
    if (m->act == ACT_GELU_TANH)
        gelu_tanh_mul(gate, up, out, n);
    else
        kernels->silu(gate, up, out, n);
}

void soft_cap(float *v, int n, float cap) { /* cap tanh(v / cap) */
    for (int i = 0; i < n; i++) v[i] = cap * tanhf(v[i] / cap);
}

void norm_add(const float *in, const float *w, float *x, float *tmp, int n, float eps) {
    rms_norm(in, w, tmp, n, eps);
    for (int i = 0; i < n; i++) x[i] += tmp[i];
}
