/*
 * faultmod: a PKCS #11 v2.40 module that injects faults in front of a real one.
 *
 * Every function of CK_FUNCTION_LIST is forwarded to the module named by
 * $FAULTMOD_TARGET (default /usr/lib/softhsm/libsofthsm2.so). C_Initialize
 * forwards its pInitArgs unchanged, so an application that asks for
 * CKF_OS_LOCKING_OK gets a thread-safe real module.
 *
 * Before a call that names a slot or a session, faultmod finds the label of
 * the token it is for (session -> slot from its own table of the sessions it
 * saw opened, else the real C_GetSessionInfo; slot -> label with the real
 * C_GetTokenInfo, cached per slot: these look-ups never see faults) and
 * applies the rules of the control file $FAULTMOD_CONTROL, one per line:
 *
 *     # comment
 *     <token-label|*> ok
 *     <token-label|*> device_error | device_removed | device_memory |
 *                     token_not_present | token_not_recognized |
 *                     function_failed | general_error | host_memory |
 *                     session_handle_invalid | session_closed |
 *                     session_count | user_not_logged_in
 *     <token-label|*> error <code>          (a CKR name as above or a number, 0x30)
 *     <token-label|*> fail_ratio <0..1> [code]   (default code function_failed)
 *     <token-label|*> latency <ms>          (sleep, then go on)
 *     <token-label|*> hang                  (block until no hang rule matches)
 *     <token-label|*> invalidate_sessions   (one-shot per new file version)
 *
 * Any rule but invalidate_sessions may end with "on <C_Function>": it then
 * applies to that call only ("use1-a device_error on C_DestroyObject"), as
 * far as the rules below let it reach that call.
 *
 * Rules for the exact label apply first, in file order, then the "*" rules;
 * "ok" stops the evaluation (so "use1-a ok" exempts use1-a from "* ..."). A
 * call gets at most one error. Lines that do not parse are reported on stderr
 * and ignored.
 *
 * The file is stat()ed on every call and re-read when its identity (inode,
 * mtime, size) changes, and at least every 50 ms otherwise; a new version is
 * a change of content (so writers should make every write unique; the Python
 * controller writes a serial number). Rules therefore apply to the next call
 * after an atomic rename of the control file.
 *
 * Where faults land:
 *   - never on C_Initialize, C_Finalize, C_GetInfo, C_GetFunctionList,
 *     C_GetSlotList, C_GetSlotInfo, C_WaitForSlotEvent;
 *   - error codes on every other call that starts something or stands alone
 *     (C_OpenSession, C_Login, C_*Init, C_GenerateKey*, C_WrapKey,
 *     C_GetAttributeValue, C_GetTokenInfo, ...);
 *   - on calls that continue or finish an operation (C_Sign, C_SignUpdate,
 *     C_SignFinal, C_Encrypt..., C_FindObjects, C_FindObjectsFinal) only
 *     latency, hang and invalidated sessions, never an error code: the real
 *     module would still hold the operation active (the next C_SignInit would
 *     answer CKR_OPERATION_ACTIVE), a state no real device failure produces.
 *     Except an "error ... on C_FindObjects" rule: faultmod ends the real search
 *     first, as a module that ends a search on a failure would, and the
 *     application's C_FindObjectsFinal answers CKR_OPERATION_NOT_INITIALIZED;
 *   - C_CloseSession and C_CloseAllSessions under an error rule still close
 *     the real sessions, then answer the error (no leaked sessions).
 *
 * invalidate_sessions: when a new control-file version containing it is
 * loaded, every session of the matching tokens open at that moment is doomed:
 * its next use (whatever the call) really closes it on the real module and
 * answers CKR_SESSION_HANDLE_INVALID, as does every later use. Sessions
 * opened afterwards work. The real close happens in the thread that next uses
 * the session, never under another thread's running operation.
 *
 * Counters per label (calls that reached the rules, and faults injected: an
 * error, a latency, a hang or an invalidated session) are written to
 * $FAULTMOD_CONTROL.stats as "label calls faults" lines, every 100 ms when they
 * changed, on C_Finalize and at unload. One file per control path: processes
 * sharing a control file overwrite each other's stats.
 *
 * $FAULTMOD_TRACE (any non-empty value): every call that reaches the gate
 * is logged on stderr with its slot, session and answer ("faultmod-trace:").
 *
 * $FAULTMOD_CANT_LOCK (any non-empty value): C_Initialize answers
 * CKR_CANT_LOCK to an application that asks for CKF_OS_LOCKING_OK without
 * mutex functions of its own, as a module that cannot use the OS's locks does;
 * without that flag (or with NULL) it initialises the real module as usual.
 *
 * Build: gcc -shared -fPIC -O2 -o libfaultmod.so faultmod.c -ldl -lpthread
 * (needs the p11-kit header: Debian package libp11-kit-dev).
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#if __has_include(<p11-kit-1/p11-kit/pkcs11.h>)
#include <p11-kit-1/p11-kit/pkcs11.h>
#else
#error "faultmod needs the PKCS #11 header of p11-kit: apt-get install libp11-kit-dev"
#endif

#define EXPORT __attribute__((visibility("default")))

#define DEFAULT_TARGET "/usr/lib/softhsm/libsofthsm2.so"
#define LABEL_LEN 32
#define MAX_RULES 256
#define MAX_CONTROL_BYTES (64 * 1024)
#define MAX_SLOTS 512
#define MAX_LABELS 256
#define SESSION_BUCKETS 1024
#define MS 1000000LL
#define REREAD_NS (50 * MS)
#define STATS_NS (100 * MS)
#define HANG_POLL_NS (10 * MS)

/* gate() flags */
#define G_SESSION 1 /* the call names a session (else a slot) */
#define G_CONT 2    /* continues or finishes an operation: no error codes */
#define G_CLOSE 4   /* closes the session: forget a dead handle */
#define G_ENDS 8    /* with G_CONT: an "error ... on <this call>" rule applies, the wrapper ending
                       the real operation first (C_FindObjects) */

enum mode { M_OK, M_ERROR, M_RATIO, M_LATENCY, M_HANG, M_INVALIDATE };

#define FN_LEN 40

struct rule {
    char label[LABEL_LEN + 1];
    char fn[FN_LEN + 1]; /* "": every call; else only this one ("C_DestroyObject") */
    enum mode mode;
    CK_RV code;
    double ratio;
    double ms;
};

struct label_stat {
    char label[LABEL_LEN + 1];
    unsigned long long calls, faults;
};

struct slot_entry {
    CK_SLOT_ID slot;
    int stat; /* index in g_stats, -1: the token has no label */
};

enum sess_state { S_LIVE, S_DOOMED, S_DEAD };

struct sess {
    CK_SESSION_HANDLE handle;
    CK_SLOT_ID slot;
    enum sess_state state;
    struct sess *next;
};

/* Everything below is guarded by g_mu; no real-module call is made under it
 * (except C_GetFunctionList/C_Initialize/C_Finalize bookkeeping, which holds
 * g_init_mu instead). */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_init_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_write_mu = PTHREAD_MUTEX_INITIALIZER;

static void *g_dl;
static CK_FUNCTION_LIST_PTR g_real;
static char *g_control;    /* NULL: no control file, pure pass-through */
static char *g_stats_path;
static int g_trace; /* $FAULTMOD_TRACE: every gated call on stderr */

static struct rule g_rules[MAX_RULES];
static int g_nrules;
static struct {
    int exists;
    dev_t dev;
    ino_t ino;
    struct timespec mtime;
    off_t size;
    long long last_read;
    char *content;
    size_t content_len;
    unsigned long version;
} g_ctl;

static struct label_stat g_stats[MAX_LABELS];
static int g_nstats;
static int g_stats_dirty;

static struct slot_entry g_slots[MAX_SLOTS];
static int g_nslots;

static struct sess *g_sess[SESSION_BUCKETS];

static pthread_t g_writer;
static int g_writer_running;
static pid_t g_writer_pid; /* a forked child has no writer thread to join */
static int g_writer_stop; /* __atomic */

static CK_FUNCTION_LIST g_list;

/* ---------------------------------------------------------------- helpers */

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_ns(long long ns)
{
    struct timespec ts = {.tv_sec = ns / 1000000000LL, .tv_nsec = ns % 1000000000LL};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

static __thread uint64_t t_rng;

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* Uniform in [0, 1), one xorshift64* state per thread: no lock, no sharing. */
static double rng_uniform(void)
{
    static uint64_t seq;
    if (t_rng == 0) {
        uint64_t seed = (uint64_t)now_ns() ^ ((uint64_t)(uintptr_t)&t_rng << 16) ^
                        __atomic_add_fetch(&seq, 1, __ATOMIC_RELAXED) * 0x2545F4914F6CDD1DULL;
        t_rng = splitmix64(seed) | 1;
    }
    t_rng ^= t_rng >> 12;
    t_rng ^= t_rng << 25;
    t_rng ^= t_rng >> 27;
    return (double)((t_rng * 0x2545F4914F6CDD1DULL) >> 11) * (1.0 / 9007199254740992.0);
}

static void warn(const char *fmt, const char *a, int line, const char *b)
{
    fprintf(stderr, "faultmod: ");
    fprintf(stderr, fmt, a, line, b);
    fputc('\n', stderr);
}

static const struct {
    const char *name;
    CK_RV code;
} CODES[] = {
    {"device_error", CKR_DEVICE_ERROR},
    {"device_removed", CKR_DEVICE_REMOVED},
    {"device_memory", CKR_DEVICE_MEMORY},
    {"token_not_present", CKR_TOKEN_NOT_PRESENT},
    {"token_not_recognized", CKR_TOKEN_NOT_RECOGNIZED},
    {"function_failed", CKR_FUNCTION_FAILED},
    {"general_error", CKR_GENERAL_ERROR},
    {"host_memory", CKR_HOST_MEMORY},
    {"session_handle_invalid", CKR_SESSION_HANDLE_INVALID},
    {"session_closed", CKR_SESSION_CLOSED},
    {"session_count", CKR_SESSION_COUNT},
    {"user_not_logged_in", CKR_USER_NOT_LOGGED_IN},
};

static int named_code(const char *s, CK_RV *code)
{
    for (size_t i = 0; i < sizeof CODES / sizeof CODES[0]; i++)
        if (strcmp(s, CODES[i].name) == 0) {
            *code = CODES[i].code;
            return 1;
        }
    return 0;
}

static int parse_code(const char *s, CK_RV *code)
{
    if (named_code(s, code))
        return 1;
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 0);
    if (errno || end == s || *end || v == CKR_OK)
        return 0;
    *code = v;
    return 1;
}

static int parse_double(const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || v != v)
        return 0;
    *out = v;
    return 1;
}

/* ------------------------------------------------------- sessions, labels */

static struct sess *sess_find(CK_SESSION_HANDLE h)
{
    for (struct sess *e = g_sess[h % SESSION_BUCKETS]; e; e = e->next)
        if (e->handle == h)
            return e;
    return NULL;
}

static void sess_put(CK_SESSION_HANDLE h, CK_SLOT_ID slot, int overwrite)
{
    struct sess *e = sess_find(h);
    if (e) {
        if (overwrite) {
            e->slot = slot;
            e->state = S_LIVE;
        }
        return;
    }
    e = malloc(sizeof *e);
    if (!e)
        return;
    e->handle = h;
    e->slot = slot;
    e->state = S_LIVE;
    e->next = g_sess[h % SESSION_BUCKETS];
    g_sess[h % SESSION_BUCKETS] = e;
}

static void sess_remove(CK_SESSION_HANDLE h)
{
    for (struct sess **p = &g_sess[h % SESSION_BUCKETS]; *p; p = &(*p)->next)
        if ((*p)->handle == h) {
            struct sess *e = *p;
            *p = e->next;
            free(e);
            return;
        }
}

static void sess_remove_slot(CK_SLOT_ID slot)
{
    for (int b = 0; b < SESSION_BUCKETS; b++)
        for (struct sess **p = &g_sess[b]; *p;) {
            if ((*p)->slot == slot) {
                struct sess *e = *p;
                *p = e->next;
                free(e);
            } else {
                p = &(*p)->next;
            }
        }
}

static void sess_clear(void)
{
    for (int b = 0; b < SESSION_BUCKETS; b++)
        while (g_sess[b]) {
            struct sess *e = g_sess[b];
            g_sess[b] = e->next;
            free(e);
        }
}

/* 1 and *stat when the slot is cached, else 0. */
static int slot_lookup(CK_SLOT_ID slot, int *stat)
{
    for (int i = 0; i < g_nslots; i++)
        if (g_slots[i].slot == slot) {
            *stat = g_slots[i].stat;
            return 1;
        }
    return 0;
}

static void slot_forget(CK_SLOT_ID slot)
{
    for (int i = 0; i < g_nslots; i++)
        if (g_slots[i].slot == slot) {
            g_slots[i] = g_slots[--g_nslots];
            return;
        }
}

static int stat_for_label(const char *label)
{
    for (int i = 0; i < g_nstats; i++)
        if (strcmp(g_stats[i].label, label) == 0)
            return i;
    if (g_nstats == MAX_LABELS)
        return -1;
    memcpy(g_stats[g_nstats].label, label, LABEL_LEN + 1);
    g_stats[g_nstats].calls = g_stats[g_nstats].faults = 0;
    return g_nstats++;
}

/* The stats index of the token in `slot`, asking the real module (never
 * faulted) on a cache miss. -1: no token, or a token without a label. */
static int resolve_slot(CK_SLOT_ID slot)
{
    int stat;
    pthread_mutex_lock(&g_mu);
    int cached = slot_lookup(slot, &stat);
    pthread_mutex_unlock(&g_mu);
    if (cached)
        return stat;

    CK_TOKEN_INFO info;
    if (g_real->C_GetTokenInfo(slot, &info) != CKR_OK)
        return -1; /* not cached: the token may come back */
    char label[LABEL_LEN + 1];
    memcpy(label, info.label, LABEL_LEN);
    label[LABEL_LEN] = '\0';
    for (int i = LABEL_LEN - 1; i >= 0 && (label[i] == ' ' || label[i] == '\0'); i--)
        label[i] = '\0';

    pthread_mutex_lock(&g_mu);
    if (!slot_lookup(slot, &stat)) {
        stat = label[0] ? stat_for_label(label) : -1;
        if (g_nslots < MAX_SLOTS)
            g_slots[g_nslots++] = (struct slot_entry){.slot = slot, .stat = stat};
    }
    pthread_mutex_unlock(&g_mu);
    return stat;
}

static const char *slot_label(CK_SLOT_ID slot)
{
    int stat;
    if (slot_lookup(slot, &stat) && stat >= 0)
        return g_stats[stat].label;
    return NULL;
}

static int label_matches(const char *rule, const char *label)
{
    return strcmp(rule, "*") == 0 || strcmp(rule, label) == 0;
}

/* ----------------------------------------------------------- control file */

static int parse_line(char *line, int lineno, struct rule *r)
{
    char *save, *tok[7];
    int n = 0;
    for (char *t = strtok_r(line, " \t\r", &save); t; t = strtok_r(NULL, " \t\r", &save)) {
        if (n == 7)
            break;
        tok[n++] = t;
    }
    if (n == 0 || tok[0][0] == '#')
        return 0;
    const char *fn = "";
    if (n >= 4 && strcmp(tok[n - 2], "on") == 0) {
        fn = tok[n - 1];
        n -= 2;
        if (strncmp(fn, "C_", 2) != 0 || strlen(fn) > FN_LEN) {
            warn("%s:%d: '%s' is not a PKCS #11 function name (line ignored)", g_control, lineno, fn);
            return 0;
        }
    }
    if (n < 2) {
        warn("%s:%d: no mode for '%s' (line ignored)", g_control, lineno, tok[0]);
        return 0;
    }
    if (strlen(tok[0]) > LABEL_LEN) {
        warn("%s:%d: label '%s' is longer than 32 bytes (line ignored)", g_control, lineno, tok[0]);
        return 0;
    }
    memset(r, 0, sizeof *r);
    strcpy(r->label, tok[0]);
    strcpy(r->fn, fn);
    const char *m = tok[1];
    int want = 2; /* how many fields the mode takes */
    int ok = 1;
    if (strcmp(m, "ok") == 0) {
        r->mode = M_OK;
    } else if (named_code(m, &r->code)) {
        r->mode = M_ERROR;
    } else if (strcmp(m, "error") == 0) {
        r->mode = M_ERROR;
        want = 3;
        ok = n >= 3 && parse_code(tok[2], &r->code);
    } else if (strcmp(m, "fail_ratio") == 0) {
        r->mode = M_RATIO;
        r->code = CKR_FUNCTION_FAILED;
        want = n >= 4 ? 4 : 3;
        ok = n >= 3 && parse_double(tok[2], &r->ratio) && r->ratio >= 0 && r->ratio <= 1 &&
             (n < 4 || parse_code(tok[3], &r->code));
    } else if (strcmp(m, "latency") == 0) {
        r->mode = M_LATENCY;
        want = 3;
        ok = n >= 3 && parse_double(tok[2], &r->ms) && r->ms >= 0 && r->ms <= 3600e3;
    } else if (strcmp(m, "hang") == 0) {
        r->mode = M_HANG;
    } else if (strcmp(m, "invalidate_sessions") == 0) {
        r->mode = M_INVALIDATE;
    } else {
        warn("%s:%d: unknown mode '%s' (line ignored)", g_control, lineno, m);
        return 0;
    }
    if (!ok || n != want) {
        warn("%s:%d: bad arguments for mode '%s' (line ignored)", g_control, lineno, m);
        return 0;
    }
    return 1;
}

static void parse_rules(const char *content, size_t len)
{
    char *text = malloc(len + 1);
    if (!text)
        return;
    memcpy(text, content, len);
    text[len] = '\0';
    int n = 0, lineno = 0;
    char *rest = text, *line;
    while ((line = strsep(&rest, "\n")) != NULL) {
        lineno++;
        struct rule r;
        if (!parse_line(line, lineno, &r))
            continue;
        if (n == MAX_RULES) {
            warn("%s:%d: more than 256 rules%s", g_control, lineno, " (rest ignored)");
            break;
        }
        g_rules[n++] = r;
    }
    g_nrules = n;
    free(text);
}

/* A new version was loaded: doom the live sessions of invalidated tokens. */
static void apply_invalidations(void)
{
    for (int i = 0; i < g_nrules; i++) {
        if (g_rules[i].mode != M_INVALIDATE)
            continue;
        for (int b = 0; b < SESSION_BUCKETS; b++)
            for (struct sess *e = g_sess[b]; e; e = e->next) {
                const char *label = slot_label(e->slot);
                if (e->state == S_LIVE && label && label_matches(g_rules[i].label, label))
                    e->state = S_DOOMED;
            }
    }
}

static void read_control(int exists, long long now)
{
    char *content = NULL;
    size_t len = 0;
    struct stat fst;
    if (exists) {
        int fd = open(g_control, O_RDONLY | O_CLOEXEC);
        if (fd >= 0 && fstat(fd, &fst) == 0) { /* the identity of what is read */
            content = malloc(MAX_CONTROL_BYTES);
            if (content) {
                ssize_t r;
                while (len < MAX_CONTROL_BYTES &&
                       ((r = read(fd, content + len, MAX_CONTROL_BYTES - len)) > 0 ||
                        (r == -1 && errno == EINTR)))
                    if (r > 0)
                        len += (size_t)r;
            }
            close(fd);
        } else {
            if (fd >= 0)
                close(fd);
            exists = 0;
        }
    }
    g_ctl.last_read = now;
    int changed = exists != g_ctl.exists || len != g_ctl.content_len ||
                  (len && memcmp(content, g_ctl.content, len) != 0);
    g_ctl.exists = exists;
    if (exists) {
        g_ctl.dev = fst.st_dev;
        g_ctl.ino = fst.st_ino;
        g_ctl.mtime = fst.st_mtim;
        g_ctl.size = fst.st_size;
    }
    if (!changed) {
        free(content);
        return;
    }
    free(g_ctl.content);
    g_ctl.content = content;
    g_ctl.content_len = len;
    g_ctl.version++;
    parse_rules(content ? content : "", len);
    apply_invalidations();
}

/* Called with g_mu held; *st / exists from a stat() made without it. */
static void refresh_control(int exists, const struct stat *st)
{
    long long now = now_ns();
    int same = exists == g_ctl.exists &&
               (!exists || (st->st_ino == g_ctl.ino && st->st_dev == g_ctl.dev &&
                            st->st_size == g_ctl.size && st->st_mtim.tv_sec == g_ctl.mtime.tv_sec &&
                            st->st_mtim.tv_nsec == g_ctl.mtime.tv_nsec));
    if (!same || now - g_ctl.last_read >= REREAD_NS)
        read_control(exists, now);
}

static void check_control_locked(void)
{
    struct stat st;
    int exists = stat(g_control, &st) == 0;
    refresh_control(exists, &st);
}

/* The rules that apply to `label` and the call `fn`, exact labels first, cut at the first "ok". */
static int collect_rules(const char *label, const char *fn, struct rule *out, int max)
{
    int n = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < g_nrules; i++) {
            const struct rule *r = &g_rules[i];
            int exact = strcmp(r->label, label) == 0;
            if (pass == 0 ? !exact : strcmp(r->label, "*") != 0)
                continue;
            if (r->fn[0] && strcmp(r->fn, fn) != 0)
                continue;
            if (r->mode == M_INVALIDATE)
                continue;
            if (r->mode == M_OK || n == max)
                return n;
            out[n++] = *r;
        }
    return n;
}

/* --------------------------------------------------------------- stats */

static void write_stats(void)
{
    if (!g_stats_path)
        return;
    char *buf = NULL;
    size_t cap = 0;
    FILE *mem = open_memstream(&buf, &cap);
    if (!mem)
        return;
    pthread_mutex_lock(&g_mu);
    fprintf(mem, "# faultmod pid %d control-version %lu: label calls faults\n", (int)getpid(), g_ctl.version);
    for (int i = 0; i < g_nstats; i++)
        fprintf(mem, "%s %llu %llu\n", g_stats[i].label, g_stats[i].calls, g_stats[i].faults);
    g_stats_dirty = 0;
    pthread_mutex_unlock(&g_mu);
    fclose(mem);

    pthread_mutex_lock(&g_write_mu);
    size_t n = strlen(g_stats_path) + 32;
    char *tmp = malloc(n);
    if (tmp) {
        snprintf(tmp, n, "%s.%d.tmp", g_stats_path, (int)getpid());
        int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd >= 0) {
            size_t len = strlen(buf), off = 0;
            while (off < len) {
                ssize_t w = write(fd, buf + off, len - off);
                if (w < 0 && errno == EINTR)
                    continue;
                if (w <= 0)
                    break;
                off += (size_t)w;
            }
            close(fd);
            if (off == len)
                rename(tmp, g_stats_path);
            else
                unlink(tmp);
        }
        free(tmp);
    }
    pthread_mutex_unlock(&g_write_mu);
    free(buf);
}

static void *writer_main(void *arg)
{
    (void)arg;
    long long next = now_ns() + STATS_NS;
    while (!__atomic_load_n(&g_writer_stop, __ATOMIC_ACQUIRE)) {
        sleep_ns(HANG_POLL_NS);
        if (now_ns() < next)
            continue;
        next = now_ns() + STATS_NS;
        pthread_mutex_lock(&g_mu);
        int dirty = g_stats_dirty;
        pthread_mutex_unlock(&g_mu);
        if (dirty)
            write_stats();
    }
    return NULL;
}

static void stop_writer(void)
{
    if (!g_writer_running || g_writer_pid != getpid())
        return;
    __atomic_store_n(&g_writer_stop, 1, __ATOMIC_RELEASE);
    pthread_join(g_writer, NULL);
    g_writer_running = 0;
}

static void count(int stat, int fault)
{
    if (stat < 0)
        return;
    if (fault)
        g_stats[stat].faults++;
    else
        g_stats[stat].calls++;
    g_stats_dirty = 1;
}

/* ------------------------------------------------------------------ gate */

static CK_RV apply_rules(int stat, const char *fn, int flags)
{
    struct rule rules[32];
    int n, first = 1, counted = 0, delayed = 0;
    const char *label = g_stats[stat].label; /* written once, before publication */
    for (;;) {
        pthread_mutex_lock(&g_mu);
        if (first)
            count(stat, 0);
        else
            check_control_locked();
        n = collect_rules(label, fn, rules, 32);
        int hang = 0;
        for (int i = 0; i < n; i++)
            hang |= rules[i].mode == M_HANG;
        if (hang && !counted) {
            count(stat, 1); /* now, so that the stats show a hang in progress */
            counted = 1;
        }
        pthread_mutex_unlock(&g_mu);
        first = 0;
        if (!hang)
            break;
        sleep_ns(HANG_POLL_NS);
    }
    CK_RV rv = CKR_OK;
    for (int i = 0; i < n && rv == CKR_OK; i++) {
        const struct rule *r = &rules[i];
        switch (r->mode) {
        case M_LATENCY:
            sleep_ns((long long)(r->ms * MS));
            delayed = 1;
            break;
        case M_ERROR:
            if (!(flags & G_CONT) || ((flags & G_ENDS) && r->fn[0]))
                rv = r->code;
            break;
        case M_RATIO:
            if (!(flags & G_CONT) && rng_uniform() < r->ratio)
                rv = r->code;
            break;
        default:
            break;
        }
    }
    if (!counted && (rv != CKR_OK || delayed)) {
        pthread_mutex_lock(&g_mu);
        count(stat, 1);
        pthread_mutex_unlock(&g_mu);
    }
    return rv;
}

/*
 * Decide the fate of one call. CKR_OK: forward it. Otherwise the code to
 * answer; *dead is set when it is an invalidated session's answer (then the
 * call must not be forwarded at all).
 */
static CK_RV gate_(const char *fn, CK_SLOT_ID slot, CK_SESSION_HANDLE h, int flags, int *dead);

static CK_RV gate(const char *fn, CK_SLOT_ID slot, CK_SESSION_HANDLE h, int flags, int *dead)
{
    CK_RV rv = gate_(fn, slot, h, flags, dead);
    if (g_trace)
        fprintf(stderr, "faultmod-trace: %s slot=%lu session=%lu -> 0x%lx\n", fn, slot, h, rv);
    return rv;
}

static CK_RV gate_(const char *fn, CK_SLOT_ID slot, CK_SESSION_HANDLE h, int flags, int *dead)
{
    if (dead)
        *dead = 0;
    if (!g_control)
        return CKR_OK;
    struct stat st;
    int exists = stat(g_control, &st) == 0;
    int stat_idx = -1, have_slot = !(flags & G_SESSION), cached = 0;

    pthread_mutex_lock(&g_mu);
    refresh_control(exists, &st);
    if (flags & G_SESSION) {
        struct sess *e = sess_find(h);
        if (e && e->state != S_LIVE) {
            int doomed = e->state == S_DOOMED;
            int s;
            if (slot_lookup(e->slot, &s)) {
                count(s, 0);
                count(s, 1);
            }
            if (flags & G_CLOSE)
                sess_remove(h);
            else
                e->state = S_DEAD;
            pthread_mutex_unlock(&g_mu);
            if (doomed)
                g_real->C_CloseSession(h);
            if (dead)
                *dead = 1;
            return CKR_SESSION_HANDLE_INVALID;
        }
        if (e) {
            slot = e->slot;
            have_slot = 1;
        }
    }
    if (have_slot)
        cached = slot_lookup(slot, &stat_idx);
    pthread_mutex_unlock(&g_mu);

    if (!have_slot) {
        CK_SESSION_INFO info;
        if (g_real->C_GetSessionInfo(h, &info) != CKR_OK)
            return CKR_OK; /* let the real module answer for this handle */
        slot = info.slotID;
        pthread_mutex_lock(&g_mu);
        sess_put(h, slot, 0);
        pthread_mutex_unlock(&g_mu);
    }
    if (!cached)
        stat_idx = resolve_slot(slot);
    if (stat_idx < 0)
        return CKR_OK;
    return apply_rules(stat_idx, fn, flags);
}

/* ------------------------------------------------------ general functions */

#define NEED_REAL()                                                                                 \
    do {                                                                                            \
        if (!g_real)                                                                                \
            return CKR_CRYPTOKI_NOT_INITIALIZED;                                                    \
    } while (0)

static CK_RV load_target(void)
{
    if (g_real)
        return CKR_OK;
    const char *target = getenv("FAULTMOD_TARGET");
    if (!target || !*target)
        target = DEFAULT_TARGET;
    void *dl = dlopen(target, RTLD_NOW | RTLD_LOCAL);
    if (!dl) {
        fprintf(stderr, "faultmod: cannot load FAULTMOD_TARGET %s: %s\n", target, dlerror());
        return CKR_GENERAL_ERROR;
    }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(dl, "C_GetFunctionList");
    CK_FUNCTION_LIST_PTR list = NULL;
    if (!get || get(&list) != CKR_OK || !list) {
        fprintf(stderr, "faultmod: %s has no usable C_GetFunctionList\n", target);
        dlclose(dl);
        return CKR_GENERAL_ERROR;
    }
    g_dl = dl;
    g_real = list;
    return CKR_OK;
}

static char *dup_env(const char *name)
{
    const char *v = getenv(name);
    return v && *v ? strdup(v) : NULL;
}

static int refuses_os_locking(CK_VOID_PTR pInitArgs)
{
    const char *v = getenv("FAULTMOD_CANT_LOCK");
    const CK_C_INITIALIZE_ARGS *args = pInitArgs;
    return v && *v && args && (args->flags & CKF_OS_LOCKING_OK) && !args->CreateMutex;
}

static CK_RV fm_C_Initialize(CK_VOID_PTR pInitArgs)
{
    if (refuses_os_locking(pInitArgs))
        return CKR_CANT_LOCK;
    pthread_mutex_lock(&g_init_mu);
    CK_RV rv = load_target();
    if (rv == CKR_OK)
        rv = g_real->C_Initialize(pInitArgs);
    if (rv == CKR_OK) {
        stop_writer();
        pthread_mutex_lock(&g_mu);
        free(g_control);
        free(g_stats_path);
        g_control = dup_env("FAULTMOD_CONTROL");
        g_trace = getenv("FAULTMOD_TRACE") && *getenv("FAULTMOD_TRACE");
        g_stats_path = NULL;
        if (g_control && asprintf(&g_stats_path, "%s.stats", g_control) < 0)
            g_stats_path = NULL;
        sess_clear();
        g_nslots = 0;
        free(g_ctl.content);
        memset(&g_ctl, 0, sizeof g_ctl);
        g_nrules = 0;
        if (g_control)
            check_control_locked();
        pthread_mutex_unlock(&g_mu);
        if (g_stats_path) {
            __atomic_store_n(&g_writer_stop, 0, __ATOMIC_RELEASE);
            g_writer_pid = getpid();
            g_writer_running = pthread_create(&g_writer, NULL, writer_main, NULL) == 0;
        }
    }
    pthread_mutex_unlock(&g_init_mu);
    return rv;
}

static CK_RV fm_C_Finalize(CK_VOID_PTR pReserved)
{
    NEED_REAL();
    pthread_mutex_lock(&g_init_mu);
    CK_RV rv = g_real->C_Finalize(pReserved);
    if (rv == CKR_OK) {
        stop_writer();
        write_stats();
        pthread_mutex_lock(&g_mu);
        sess_clear();
        g_nslots = 0;
        pthread_mutex_unlock(&g_mu);
    }
    pthread_mutex_unlock(&g_init_mu);
    return rv;
}

__attribute__((destructor)) static void fm_unload(void)
{
    /* The process is exiting (or the module unloading) without C_Finalize:
     * keep the last counts. */
    if (g_writer_running && g_writer_pid == getpid()) {
        stop_writer();
        write_stats();
    }
}

static CK_RV fm_C_GetInfo(CK_INFO_PTR pInfo)
{
    NEED_REAL();
    return g_real->C_GetInfo(pInfo);
}

EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList)
{
    if (!ppFunctionList)
        return CKR_ARGUMENTS_BAD;
    *ppFunctionList = &g_list;
    return CKR_OK;
}

static CK_RV fm_C_GetSlotList(CK_BBOOL tokenPresent, CK_SLOT_ID_PTR pSlotList, CK_ULONG_PTR pulCount)
{
    NEED_REAL();
    return g_real->C_GetSlotList(tokenPresent, pSlotList, pulCount);
}

static CK_RV fm_C_GetSlotInfo(CK_SLOT_ID slotID, CK_SLOT_INFO_PTR pInfo)
{
    NEED_REAL();
    return g_real->C_GetSlotInfo(slotID, pInfo);
}

static CK_RV fm_C_WaitForSlotEvent(CK_FLAGS flags, CK_SLOT_ID_PTR pSlot, CK_VOID_PTR pReserved)
{
    NEED_REAL();
    return g_real->C_WaitForSlotEvent(flags, pSlot, pReserved);
}

/* --------------------------------------------------------- slot functions */

#define SLOT_CALL(name, params, args)                                                               \
    static CK_RV fm_##name params                                                                   \
    {                                                                                               \
        NEED_REAL();                                                                                \
        CK_RV rv_ = gate(#name, slotID, 0, 0, NULL);                                                \
        return rv_ != CKR_OK ? rv_ : g_real->name args;                                             \
    }

SLOT_CALL(C_GetTokenInfo, (CK_SLOT_ID slotID, CK_TOKEN_INFO_PTR pInfo), (slotID, pInfo))
SLOT_CALL(C_GetMechanismList, (CK_SLOT_ID slotID, CK_MECHANISM_TYPE_PTR pList, CK_ULONG_PTR pulCount),
          (slotID, pList, pulCount))
SLOT_CALL(C_GetMechanismInfo, (CK_SLOT_ID slotID, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR pInfo),
          (slotID, type, pInfo))

static CK_RV fm_C_InitToken(CK_SLOT_ID slotID, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen, CK_UTF8CHAR_PTR pLabel)
{
    NEED_REAL();
    CK_RV rv = gate("C_InitToken", slotID, 0, 0, NULL);
    if (rv != CKR_OK)
        return rv;
    rv = g_real->C_InitToken(slotID, pPin, ulPinLen, pLabel);
    if (rv == CKR_OK) {
        pthread_mutex_lock(&g_mu);
        slot_forget(slotID); /* the label changed */
        pthread_mutex_unlock(&g_mu);
    }
    return rv;
}

static CK_RV fm_C_OpenSession(CK_SLOT_ID slotID, CK_FLAGS flags, CK_VOID_PTR pApplication, CK_NOTIFY Notify,
                              CK_SESSION_HANDLE_PTR phSession)
{
    NEED_REAL();
    CK_RV rv = gate("C_OpenSession", slotID, 0, 0, NULL);
    if (rv != CKR_OK)
        return rv;
    rv = g_real->C_OpenSession(slotID, flags, pApplication, Notify, phSession);
    if (rv == CKR_OK && phSession) {
        pthread_mutex_lock(&g_mu);
        sess_put(*phSession, slotID, 1); /* handles are reused: forget a dead one */
        pthread_mutex_unlock(&g_mu);
    }
    return rv;
}

static CK_RV fm_C_CloseAllSessions(CK_SLOT_ID slotID)
{
    NEED_REAL();
    CK_RV injected = gate("C_CloseAllSessions", slotID, 0, 0, NULL);
    CK_RV rv = g_real->C_CloseAllSessions(slotID);
    if (rv == CKR_OK) {
        pthread_mutex_lock(&g_mu);
        sess_remove_slot(slotID);
        pthread_mutex_unlock(&g_mu);
    }
    return injected != CKR_OK ? injected : rv;
}

static CK_RV fm_C_CloseSession(CK_SESSION_HANDLE hSession)
{
    NEED_REAL();
    int dead;
    CK_RV injected = gate("C_CloseSession", 0, hSession, G_SESSION | G_CLOSE, &dead);
    if (dead)
        return injected;
    CK_RV rv = g_real->C_CloseSession(hSession);
    if (rv == CKR_OK) {
        pthread_mutex_lock(&g_mu);
        sess_remove(hSession);
        pthread_mutex_unlock(&g_mu);
    }
    return injected != CKR_OK ? injected : rv;
}

/* ------------------------------------------------------ session functions */

#define SESSION_CALL(kind, name, params, args)                                                      \
    static CK_RV fm_##name params                                                                   \
    {                                                                                               \
        NEED_REAL();                                                                                \
        CK_RV rv_ = gate(#name, 0, hSession, G_SESSION | (kind), NULL);                             \
        return rv_ != CKR_OK ? rv_ : g_real->name args;                                             \
    }
#define START 0      /* starts an operation or stands alone: every fault */
#define CONT G_CONT  /* continues or ends an operation: no error codes */

typedef CK_SESSION_HANDLE SH;
typedef CK_OBJECT_HANDLE OH;
typedef CK_BYTE_PTR BP;
typedef CK_ULONG UL;
typedef CK_ULONG_PTR ULP;
typedef CK_MECHANISM_PTR MP;
typedef CK_ATTRIBUTE_PTR AP;

SESSION_CALL(START, C_InitPIN, (SH hSession, CK_UTF8CHAR_PTR pin, UL len), (hSession, pin, len))
SESSION_CALL(START, C_SetPIN, (SH hSession, CK_UTF8CHAR_PTR o, UL ol, CK_UTF8CHAR_PTR n, UL nl),
             (hSession, o, ol, n, nl))
SESSION_CALL(START, C_GetSessionInfo, (SH hSession, CK_SESSION_INFO_PTR info), (hSession, info))
SESSION_CALL(START, C_GetOperationState, (SH hSession, BP state, ULP len), (hSession, state, len))
SESSION_CALL(START, C_SetOperationState, (SH hSession, BP state, UL len, OH ek, OH ak),
             (hSession, state, len, ek, ak))
SESSION_CALL(START, C_Login, (SH hSession, CK_USER_TYPE type, CK_UTF8CHAR_PTR pin, UL len),
             (hSession, type, pin, len))
SESSION_CALL(START, C_Logout, (SH hSession), (hSession))
SESSION_CALL(START, C_CreateObject, (SH hSession, AP t, UL n, CK_OBJECT_HANDLE_PTR o), (hSession, t, n, o))
SESSION_CALL(START, C_CopyObject, (SH hSession, OH o, AP t, UL n, CK_OBJECT_HANDLE_PTR no),
             (hSession, o, t, n, no))
SESSION_CALL(START, C_DestroyObject, (SH hSession, OH o), (hSession, o))
SESSION_CALL(START, C_GetObjectSize, (SH hSession, OH o, ULP size), (hSession, o, size))
SESSION_CALL(START, C_GetAttributeValue, (SH hSession, OH o, AP t, UL n), (hSession, o, t, n))
SESSION_CALL(START, C_SetAttributeValue, (SH hSession, OH o, AP t, UL n), (hSession, o, t, n))
SESSION_CALL(START, C_FindObjectsInit, (SH hSession, AP t, UL n), (hSession, t, n))
/* An "error ... on C_FindObjects" rule fails the call as a module that ends the search on a
 * failure does: the real search is ended first, so the application's C_FindObjectsFinal then
 * answers CKR_OPERATION_NOT_INITIALIZED. */
static CK_RV fm_C_FindObjects(SH hSession, CK_OBJECT_HANDLE_PTR o, UL max, ULP n)
{
    NEED_REAL();
    CK_RV rv_ = gate("C_FindObjects", 0, hSession, G_SESSION | G_CONT | G_ENDS, NULL);
    if (rv_ == CKR_OK)
        return g_real->C_FindObjects(hSession, o, max, n);
    if (rv_ != CKR_SESSION_HANDLE_INVALID)
        g_real->C_FindObjectsFinal(hSession);
    return rv_;
}
SESSION_CALL(CONT, C_FindObjectsFinal, (SH hSession), (hSession))
SESSION_CALL(START, C_EncryptInit, (SH hSession, MP m, OH k), (hSession, m, k))
SESSION_CALL(CONT, C_Encrypt, (SH hSession, BP d, UL dl, BP o, ULP ol), (hSession, d, dl, o, ol))
SESSION_CALL(CONT, C_EncryptUpdate, (SH hSession, BP d, UL dl, BP o, ULP ol), (hSession, d, dl, o, ol))
SESSION_CALL(CONT, C_EncryptFinal, (SH hSession, BP o, ULP ol), (hSession, o, ol))
SESSION_CALL(START, C_DecryptInit, (SH hSession, MP m, OH k), (hSession, m, k))
SESSION_CALL(CONT, C_Decrypt, (SH hSession, BP d, UL dl, BP o, ULP ol), (hSession, d, dl, o, ol))
SESSION_CALL(CONT, C_DecryptUpdate, (SH hSession, BP d, UL dl, BP o, ULP ol), (hSession, d, dl, o, ol))
SESSION_CALL(CONT, C_DecryptFinal, (SH hSession, BP o, ULP ol), (hSession, o, ol))
SESSION_CALL(START, C_DigestInit, (SH hSession, MP m), (hSession, m))
SESSION_CALL(CONT, C_Digest, (SH hSession, BP d, UL dl, BP o, ULP ol), (hSession, d, dl, o, ol))
SESSION_CALL(CONT, C_DigestUpdate, (SH hSession, BP d, UL dl), (hSession, d, dl))
SESSION_CALL(CONT, C_DigestKey, (SH hSession, OH k), (hSession, k))
SESSION_CALL(CONT, C_DigestFinal, (SH hSession, BP o, ULP ol), (hSession, o, ol))
SESSION_CALL(START, C_SignInit, (SH hSession, MP m, OH k), (hSession, m, k))
SESSION_CALL(CONT, C_Sign, (SH hSession, BP d, UL dl, BP o, ULP ol), (hSession, d, dl, o, ol))
SESSION_CALL(CONT, C_SignUpdate, (SH hSession, BP d, UL dl), (hSession, d, dl))
SESSION_CALL(CONT, C_SignFinal, (SH hSession, BP o, ULP ol), (hSession, o, ol))
SESSION_CALL(START, C_SignRecoverInit, (SH hSession, MP m, OH k), (hSession, m, k))
SESSION_CALL(CONT, C_SignRecover, (SH hSession, BP d, UL dl, BP o, ULP ol), (hSession, d, dl, o, ol))
SESSION_CALL(START, C_VerifyInit, (SH hSession, MP m, OH k), (hSession, m, k))
SESSION_CALL(CONT, C_Verify, (SH hSession, BP d, UL dl, BP s, UL sl), (hSession, d, dl, s, sl))
SESSION_CALL(CONT, C_VerifyUpdate, (SH hSession, BP d, UL dl), (hSession, d, dl))
SESSION_CALL(CONT, C_VerifyFinal, (SH hSession, BP s, UL sl), (hSession, s, sl))
SESSION_CALL(START, C_VerifyRecoverInit, (SH hSession, MP m, OH k), (hSession, m, k))
SESSION_CALL(CONT, C_VerifyRecover, (SH hSession, BP s, UL sl, BP o, ULP ol), (hSession, s, sl, o, ol))
SESSION_CALL(CONT, C_DigestEncryptUpdate, (SH hSession, BP d, UL dl, BP o, ULP ol), (hSession, d, dl, o, ol))
SESSION_CALL(CONT, C_DecryptDigestUpdate, (SH hSession, BP d, UL dl, BP o, ULP ol), (hSession, d, dl, o, ol))
SESSION_CALL(CONT, C_SignEncryptUpdate, (SH hSession, BP d, UL dl, BP o, ULP ol), (hSession, d, dl, o, ol))
SESSION_CALL(CONT, C_DecryptVerifyUpdate, (SH hSession, BP d, UL dl, BP o, ULP ol), (hSession, d, dl, o, ol))
SESSION_CALL(START, C_GenerateKey, (SH hSession, MP m, AP t, UL n, CK_OBJECT_HANDLE_PTR k),
             (hSession, m, t, n, k))
SESSION_CALL(START, C_GenerateKeyPair,
             (SH hSession, MP m, AP pt, UL pn, AP st, UL sn, CK_OBJECT_HANDLE_PTR pk, CK_OBJECT_HANDLE_PTR sk),
             (hSession, m, pt, pn, st, sn, pk, sk))
SESSION_CALL(START, C_WrapKey, (SH hSession, MP m, OH wk, OH k, BP o, ULP ol), (hSession, m, wk, k, o, ol))
SESSION_CALL(START, C_UnwrapKey, (SH hSession, MP m, OH uk, BP w, UL wl, AP t, UL n, CK_OBJECT_HANDLE_PTR k),
             (hSession, m, uk, w, wl, t, n, k))
SESSION_CALL(START, C_DeriveKey, (SH hSession, MP m, OH bk, AP t, UL n, CK_OBJECT_HANDLE_PTR k),
             (hSession, m, bk, t, n, k))
SESSION_CALL(START, C_SeedRandom, (SH hSession, BP seed, UL len), (hSession, seed, len))
SESSION_CALL(START, C_GenerateRandom, (SH hSession, BP out, UL len), (hSession, out, len))
SESSION_CALL(START, C_GetFunctionStatus, (SH hSession), (hSession))
SESSION_CALL(START, C_CancelFunction, (SH hSession), (hSession))

/* ----------------------------------------------------------- the list */

static CK_FUNCTION_LIST g_list = {
    .version = {CRYPTOKI_VERSION_MAJOR, CRYPTOKI_VERSION_MINOR},
    .C_Initialize = fm_C_Initialize,
    .C_Finalize = fm_C_Finalize,
    .C_GetInfo = fm_C_GetInfo,
    .C_GetFunctionList = C_GetFunctionList,
    .C_GetSlotList = fm_C_GetSlotList,
    .C_GetSlotInfo = fm_C_GetSlotInfo,
    .C_GetTokenInfo = fm_C_GetTokenInfo,
    .C_GetMechanismList = fm_C_GetMechanismList,
    .C_GetMechanismInfo = fm_C_GetMechanismInfo,
    .C_InitToken = fm_C_InitToken,
    .C_InitPIN = fm_C_InitPIN,
    .C_SetPIN = fm_C_SetPIN,
    .C_OpenSession = fm_C_OpenSession,
    .C_CloseSession = fm_C_CloseSession,
    .C_CloseAllSessions = fm_C_CloseAllSessions,
    .C_GetSessionInfo = fm_C_GetSessionInfo,
    .C_GetOperationState = fm_C_GetOperationState,
    .C_SetOperationState = fm_C_SetOperationState,
    .C_Login = fm_C_Login,
    .C_Logout = fm_C_Logout,
    .C_CreateObject = fm_C_CreateObject,
    .C_CopyObject = fm_C_CopyObject,
    .C_DestroyObject = fm_C_DestroyObject,
    .C_GetObjectSize = fm_C_GetObjectSize,
    .C_GetAttributeValue = fm_C_GetAttributeValue,
    .C_SetAttributeValue = fm_C_SetAttributeValue,
    .C_FindObjectsInit = fm_C_FindObjectsInit,
    .C_FindObjects = fm_C_FindObjects,
    .C_FindObjectsFinal = fm_C_FindObjectsFinal,
    .C_EncryptInit = fm_C_EncryptInit,
    .C_Encrypt = fm_C_Encrypt,
    .C_EncryptUpdate = fm_C_EncryptUpdate,
    .C_EncryptFinal = fm_C_EncryptFinal,
    .C_DecryptInit = fm_C_DecryptInit,
    .C_Decrypt = fm_C_Decrypt,
    .C_DecryptUpdate = fm_C_DecryptUpdate,
    .C_DecryptFinal = fm_C_DecryptFinal,
    .C_DigestInit = fm_C_DigestInit,
    .C_Digest = fm_C_Digest,
    .C_DigestUpdate = fm_C_DigestUpdate,
    .C_DigestKey = fm_C_DigestKey,
    .C_DigestFinal = fm_C_DigestFinal,
    .C_SignInit = fm_C_SignInit,
    .C_Sign = fm_C_Sign,
    .C_SignUpdate = fm_C_SignUpdate,
    .C_SignFinal = fm_C_SignFinal,
    .C_SignRecoverInit = fm_C_SignRecoverInit,
    .C_SignRecover = fm_C_SignRecover,
    .C_VerifyInit = fm_C_VerifyInit,
    .C_Verify = fm_C_Verify,
    .C_VerifyUpdate = fm_C_VerifyUpdate,
    .C_VerifyFinal = fm_C_VerifyFinal,
    .C_VerifyRecoverInit = fm_C_VerifyRecoverInit,
    .C_VerifyRecover = fm_C_VerifyRecover,
    .C_DigestEncryptUpdate = fm_C_DigestEncryptUpdate,
    .C_DecryptDigestUpdate = fm_C_DecryptDigestUpdate,
    .C_SignEncryptUpdate = fm_C_SignEncryptUpdate,
    .C_DecryptVerifyUpdate = fm_C_DecryptVerifyUpdate,
    .C_GenerateKey = fm_C_GenerateKey,
    .C_GenerateKeyPair = fm_C_GenerateKeyPair,
    .C_WrapKey = fm_C_WrapKey,
    .C_UnwrapKey = fm_C_UnwrapKey,
    .C_DeriveKey = fm_C_DeriveKey,
    .C_SeedRandom = fm_C_SeedRandom,
    .C_GenerateRandom = fm_C_GenerateRandom,
    .C_GetFunctionStatus = fm_C_GetFunctionStatus,
    .C_CancelFunction = fm_C_CancelFunction,
    .C_WaitForSlotEvent = fm_C_WaitForSlotEvent,
};
