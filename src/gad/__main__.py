from gad.cli import main

main()
