from astrid.cli import main

main()
