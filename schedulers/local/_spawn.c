/* The job launcher's start of a direct job as another user, without a copy of the interpreter.
 *
 * CPython's subprocess forks (copying the launcher's page tables) whenever the child must take
 * other ids, because glibc's set*id() would act on every thread of the parent that a vfork child
 * shares its memory with. Here the child is a clone(CLONE_VM | CLONE_VFORK) on a stack of its own,
 * like glibc's posix_spawn, that sets its ids with raw system calls, which change the calling task
 * only: the launcher keeps its own ids throughout, and is suspended until the child execs or fails.
 *
 * spawn(executables, argv, envp, cwd, uid, gid, groups, fds, joins, cpus) -> pid
 *   executables: the paths to try in turn (the PATH search done by the caller), as bytes;
 *   argv, envp: tuples of bytes; cwd: bytes; uid, gid: ints, -1 to keep the launcher's (then
 *   groups must be None) else groups: a tuple of the supplementary group ids; fds: the job's
 *   stdin, stdout and stderr, each open in the launcher at 3 or above; joins: a tuple of
 *   descriptors of cgroup v1 `tasks` files open for writing; cpus: None, or a tuple of the CPUs
 *   the job is pinned to.
 * The child joins the cgroups (writing 0, itself, to each `tasks` file, while it is still root)
 * and pins itself to the CPUs, so the launcher never leaves its own; then it starts a new
 * session, takes the ids (groups, then gid, then uid), enters cwd, gets its three descriptors
 * (every other one the launcher holds is close-on-exec), has the signal dispositions and mask a
 * subprocess would have, and execs. If a step fails, the child exits 127 and is reaped here, and
 * OSError says which step and why (its filename: "cgroup" when a `tasks` file refused the child).
 * The module's JOINS says that spawn takes joins and cpus (a launcher finding a build without it
 * starts jobs by subprocess).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHILD_STACK (64 * 1024)
#define MAX_GROUPS 65536
#define MAX_JOINS 16

struct job {
    char **executables;
    char **argv;
    char **envp;
    const char *cwd;
    int fds[3];
    int joins[MAX_JOINS];
    Py_ssize_t njoins;
    int set_cpus;
    cpu_set_t cpus;
    int set_ids;
    uid_t uid;
    gid_t gid;
    size_t ngroups;
    gid_t *groups;
    sigset_t mask;  /* the launcher's signal mask, for the job */
    int error;      /* errno of the failed step, 0 if the job runs */
    const char *step;
};

/* In the child, on the launcher's memory but its own stack: system calls only. */
static int child(void *arg)
{
    struct job *job = arg;
    struct sigaction action;
    int sig, i, found_error = 0;

    /* as subprocess leaves them: a caught signal would run the launcher's handler here, so it
       goes back to its default action (as an exec would do); SIGPIPE and SIGXFSZ, which Python
       ignores, too; a signal the launcher inherited as ignored stays ignored */
    for (sig = 1; sig < NSIG; sig++) {
        struct sigaction old;
        if (sigaction(sig, NULL, &old) < 0)
            continue;
        if (old.sa_handler == SIG_IGN && sig != SIGPIPE && sig != SIGXFSZ)
            continue;
        if (old.sa_handler == SIG_DFL && !(old.sa_flags & SA_SIGINFO))
            continue;
        memset(&action, 0, sizeof action);
        action.sa_handler = SIG_DFL;
        (void)sigaction(sig, &action, NULL);
    }
    /* into the job's cgroups and onto its CPUs, as root still: only this child moves */
    job->step = "cgroup";
    for (i = 0; i < job->njoins; i++) {
        if (write(job->joins[i], "0", 1) != 1)
            goto fail;
    }
    job->step = "sched_setaffinity";
    if (job->set_cpus && sched_setaffinity(0, sizeof job->cpus, &job->cpus) < 0)
        goto fail;
    job->step = "setsid";
    if (setsid() < 0)
        goto fail;
    if (job->set_ids) {
        job->step = "setgroups";
        if (syscall(SYS_setgroups, job->ngroups, job->groups) < 0)
            goto fail;
        job->step = "setresgid";
        if (syscall(SYS_setresgid, job->gid, job->gid, job->gid) < 0)
            goto fail;
        job->step = "setresuid";
        if (syscall(SYS_setresuid, job->uid, job->uid, job->uid) < 0)
            goto fail;
    }
    job->step = "chdir";
    if (chdir(job->cwd) < 0)
        goto fail;
    job->step = "dup2";
    for (i = 0; i < 3; i++) {
        if (dup2(job->fds[i], i) < 0)
            goto fail;
    }
    /* as close_fds does: nothing of the launcher's but the three (its own are close-on-exec,
       but not what it may have inherited); the kernel's close_range, else nothing to do */
    job->step = "close_range";
    if (syscall(SYS_close_range, 3U, ~0U, 0U) < 0 && errno != ENOSYS)
        goto fail;
    job->step = "sigprocmask";
    if (sigprocmask(SIG_SETMASK, &job->mask, NULL) < 0)
        goto fail;
    job->step = "execve";
    for (i = 0; job->executables[i] != NULL; i++) {
        execve(job->executables[i], job->argv, job->envp);
        /* as subprocess does: a missing candidate lets the next one be tried, and the first
           other error is the one to tell */
        if (errno != ENOENT && errno != ENOTDIR && !found_error)
            found_error = errno;
    }
    errno = found_error ? found_error : errno;
fail:
    job->error = errno ? errno : EINVAL;
    _exit(127);
}

/* A NULL-terminated vector of the bytes in `sequence` (pointers into the objects it holds, which
   the caller keeps alive); NULL with an exception set on error. */
static char **vector(PyObject *sequence, const char *what)
{
    Py_ssize_t n, i;
    char **out;

    if (!PyTuple_Check(sequence)) {
        PyErr_Format(PyExc_TypeError, "%s must be a tuple of bytes", what);
        return NULL;
    }
    n = PyTuple_GET_SIZE(sequence);
    out = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(sequence, i);
        if (!PyBytes_Check(item) || (Py_ssize_t)strlen(PyBytes_AS_STRING(item)) != PyBytes_GET_SIZE(item)) {
            PyErr_Format(PyExc_ValueError, "%s[%zd] must be bytes without NUL", what, i);
            PyMem_Free(out);
            return NULL;
        }
        out[i] = PyBytes_AS_STRING(item);
    }
    return out;
}

static PyObject *spawn(PyObject *self, PyObject *args)
{
    PyObject *executables, *argv, *envp, *cwd, *groups, *joins, *cpus, *result = NULL;
    long uid, gid;
    int fds[3], i, saved;
    struct job job;
    sigset_t all;
    char *stack = NULL;
    pid_t pid;

    (void)self;
    if (!PyArg_ParseTuple(args, "O!O!O!O!llO(iii)O!O:spawn", &PyTuple_Type, &executables, &PyTuple_Type, &argv,
                          &PyTuple_Type, &envp, &PyBytes_Type, &cwd, &uid, &gid, &groups, &fds[0], &fds[1],
                          &fds[2], &PyTuple_Type, &joins, &cpus))
        return NULL;
    memset(&job, 0, sizeof job);
    job.njoins = PyTuple_GET_SIZE(joins);
    if (job.njoins > MAX_JOINS) {
        PyErr_Format(PyExc_ValueError, "joins: at most %d cgroup files", MAX_JOINS);
        return NULL;
    }
    for (i = 0; i < job.njoins; i++) {
        long fd = PyLong_AsLong(PyTuple_GET_ITEM(joins, i));
        if (fd < 0 || fd > INT_MAX) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "joins[%d] must be an open descriptor", i);
            return NULL;
        }
        job.joins[i] = (int)fd;
    }
    if (cpus != Py_None) {
        Py_ssize_t n, k;
        if (!PyTuple_Check(cpus) || (n = PyTuple_GET_SIZE(cpus)) == 0) {
            PyErr_SetString(PyExc_ValueError, "cpus must be None or a tuple of at least one CPU number");
            return NULL;
        }
        CPU_ZERO(&job.cpus);
        for (k = 0; k < n; k++) {
            long cpu = PyLong_AsLong(PyTuple_GET_ITEM(cpus, k));
            if (cpu < 0 || cpu >= CPU_SETSIZE) {
                if (!PyErr_Occurred())
                    PyErr_Format(PyExc_ValueError, "cpus[%zd] must be a CPU number below %d", k, CPU_SETSIZE);
                return NULL;
            }
            CPU_SET((int)cpu, &job.cpus);
        }
        job.set_cpus = 1;
    }
    for (i = 0; i < 3; i++) {
        if (fds[i] < 3) {
            PyErr_Format(PyExc_ValueError, "fds[%d] is %d: the job's descriptors must be open at 3 or above", i,
                         fds[i]);
            return NULL;
        }
        job.fds[i] = fds[i];
    }
    if ((uid < 0) != (gid < 0) || (uid < 0) != (groups == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "uid, gid and groups are given together, or none of them");
        return NULL;
    }
    if (PyTuple_GET_SIZE(argv) == 0 || PyTuple_GET_SIZE(executables) == 0) {
        PyErr_SetString(PyExc_ValueError, "argv and executables must not be empty");
        return NULL;
    }
    if ((Py_ssize_t)strlen(PyBytes_AS_STRING(cwd)) != PyBytes_GET_SIZE(cwd)) {
        PyErr_SetString(PyExc_ValueError, "cwd must be bytes without NUL");
        return NULL;
    }
    job.cwd = PyBytes_AS_STRING(cwd);
    if (uid >= 0) {
        Py_ssize_t n;
        if (!PyTuple_Check(groups) || (n = PyTuple_GET_SIZE(groups)) > MAX_GROUPS) {
            PyErr_SetString(PyExc_ValueError, "groups must be a tuple of at most 65536 group ids");
            return NULL;
        }
        job.set_ids = 1;
        job.uid = (uid_t)uid;
        job.gid = (gid_t)gid;
        job.ngroups = (size_t)n;
        job.groups = PyMem_Calloc((size_t)n + 1, sizeof(gid_t));
        if (job.groups == NULL)
            return PyErr_NoMemory();
        for (i = 0; i < n; i++) {
            long group = PyLong_AsLong(PyTuple_GET_ITEM(groups, i));
            if (group < 0) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_ValueError, "a group id must not be negative");
                goto done;
            }
            job.groups[i] = (gid_t)group;
        }
    }
    if ((job.executables = vector(executables, "executables")) == NULL || (job.argv = vector(argv, "argv")) == NULL
        || (job.envp = vector(envp, "envp")) == NULL)
        goto done;
    stack = PyMem_Malloc(CHILD_STACK);
    if (stack == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* no signal handler may run in the child before it reset them; the child restores the mask */
    sigfillset(&all);
    if (pthread_sigmask(SIG_BLOCK, &all, &job.mask) != 0) {
        PyErr_SetString(PyExc_OSError, "cannot block signals");
        goto done;
    }
    pid = clone(child, stack + CHILD_STACK, CLONE_VM | CLONE_VFORK | SIGCHLD, &job);
    saved = errno;
    pthread_sigmask(SIG_SETMASK, &job.mask, NULL);
    if (pid < 0) {
        errno = saved;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    if (job.error != 0) {
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
            ;
        PyObject *step = PyUnicode_FromString(job.step);
        if (step != NULL) {
            PyObject *exc = PyObject_CallFunction(PyExc_OSError, "isO", job.error, strerror(job.error), step);
            if (exc != NULL) {
                PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
                Py_DECREF(exc);
            }
            Py_DECREF(step);
        }
        goto done;
    }
    result = PyLong_FromLong((long)pid);
done:
    PyMem_Free(stack);
    PyMem_Free(job.executables);
    PyMem_Free(job.argv);
    PyMem_Free(job.envp);
    PyMem_Free(job.groups);
    return result;
}

static PyMethodDef methods[] = {
    {"spawn", spawn, METH_VARARGS,
     "spawn(executables, argv, envp, cwd, uid, gid, groups, fds, joins, cpus) -> pid: start a job in its "
     "cgroups (joins: descriptors of v1 tasks files) and on its CPUs (None: the caller's), in a new session, as "
     "uid/gid/groups (-1, -1, None: the caller's ids), with a vfork-like clone and no copy of the caller"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_spawn", "The local job launcher's spawn of a job as another user.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__spawn(void)
{
    PyObject *made = PyModule_Create(&module);
    if (made != NULL && PyModule_AddIntConstant(made, "JOINS", 1) < 0) {
        Py_DECREF(made);
        return NULL;
    }
    return made;
}
