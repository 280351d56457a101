"""Long fuzz run of the step3p5 parsers: ``python tests/fuzz_parsers.py --cases 10000``.

Runs the property tests of the parser test files with ``--cases`` examples each instead
of the CI-sized count. Not collected by pytest (the name does not match ``test_*.py``);
exits non-zero when any property fails.
"""

import argparse
import logging
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PROPERTY_NAMES = [
    ("test_parsers_reasoning", "test_any_chunking_equals_spec"),
    ("test_parsers_reasoning", "test_corpus_any_chunking"),
    ("test_parsers_tool_call", "test_corpus_any_chunking"),
    ("test_parsers_tool_call", "test_tag_soup_never_raises_loses_nothing_and_is_chunking_invariant"),
    ("test_parsers_malformed", "test_malformed_soup_never_raises_loses_nothing_and_is_chunking_invariant"),
    ("test_parsers_public_api", "test_any_grammar_output_parses_as_the_grammar_reads_it"),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=10000, help="examples per property")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (random by default)")
    args = parser.parse_args(argv)
    # Malformed inputs are expected here; their per-call warnings would drown the report.
    logging.getLogger("sglang_step35").setLevel(logging.ERROR)
    # Read by the test modules' settings at import time.
    os.environ["SGLANG_STEP35_PARSER_CASES"] = str(args.cases)
    import importlib

    from hypothesis import seed

    from sglang_step35.parsers import register_parsers

    # Properties that go through SGLang's FunctionCallParser need "step3p5" to be ours, as
    # the plugin makes it in a server (pytest does this with a fixture).
    register_parsers()

    failed = 0
    for module_name, test_name in PROPERTY_NAMES:
        run = getattr(importlib.import_module(module_name), test_name)
        if args.seed is not None:
            run = seed(args.seed)(run)
        name = f"{module_name}.{test_name}"
        start = time.monotonic()
        try:
            run()
        except Exception:
            failed += 1
            traceback.print_exc()
            print(f"FAIL {name}", flush=True)
            continue
        print(f"ok   {name}: {args.cases} cases in {time.monotonic() - start:.1f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
