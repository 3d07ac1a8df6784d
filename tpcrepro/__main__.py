from tpcrepro.cli import main

main()
