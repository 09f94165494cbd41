from smolalign.cli import main

main()
