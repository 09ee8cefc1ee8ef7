from lit_selfimprove.cli import main

main()
