from kmdask.cli import main

if __name__ == "__main__":  # not when a multiprocessing server imports the main module
    raise SystemExit(main())
