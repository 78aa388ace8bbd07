"""Command line: ``python -m hashemb demo [...]`` (the DLRM comparison) and
``python -m hashemb config`` (what the build has)."""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\n  demo     train DLRM: full vs RobeZ vs HashedNet vs hashing trick"
              "\n  config   print the build configuration"
              "\n  tt-bench TT-Rec benchmark (FBTT's setup) beside torch.nn.EmbeddingBag"
              "\n  lsh-table learn an SCMA table / LMA signatures from data (--help)")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo
        demo(rest)
        return 0
    if cmd == "tt-bench":
        from .tt_bench import main as tt_bench
        tt_bench(rest)
        return 0
    if cmd == "lsh-table":
        from .lsh import main as lsh_table
        lsh_table(rest)
        return 0
    if cmd == "config":
        from . import show_config
        show_config()
        return 0
    print(f"unknown command {cmd!r}: expected 'demo', 'tt-bench', 'lsh-table' or 'config'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
