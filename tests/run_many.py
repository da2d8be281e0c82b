"""`python run.py ARGS` for several command lines in one interpreter: the slow imports (torch, Lightning, Hydra) once,
then one forked child per command line, each in its own folder, with its own exit code, stdout and stderr. A forked
child starts from a process that has imported but not run anything, so it behaves as a fresh `python run.py`.

    python tests/run_many.py RUN_PY CASES_JSON   (CASES_JSON: [[cwd, [args...]], ...]; prints [exit codes])
"""

import json
import os
import runpy
import sys
import traceback

import hydra  # noqa: F401  (the imports run.py makes, paid once)

import metaformer_lab.train  # noqa: F401


def run_one(run_py: str, cwd: str, args: list[str]) -> int:
    os.chdir(cwd)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [run_py, *args]
    try:
        runpy.run_path(run_py, run_name="__main__")
        return 0
    except SystemExit as stop:  # as the interpreter would: a message goes to stderr with status 1
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def main() -> None:
    run_py, cases = sys.argv[1], json.loads(sys.argv[2])
    codes = []
    for cwd, args in cases:
        pid = os.fork()
        if pid == 0:
            code = run_one(run_py, cwd, args)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    print(json.dumps(codes))


if __name__ == "__main__":
    main()
